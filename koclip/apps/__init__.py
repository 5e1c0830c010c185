"""The demo web app's parts: `page` (the Streamlit page) and `harness` (server + browser helpers).

Start the app with `python -m koclip.app`; see koclip/app.py and docs/app.md.
"""
