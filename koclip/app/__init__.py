"""The demo web app (Streamlit): `python -m koclip.app`. launcher.py checks the paths and starts
the server; page.py is the page Streamlit runs."""
