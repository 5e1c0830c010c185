"""The Streamlit page of the demo app. Serve it with `python -m koclip.app`, not directly.

Streamlit runs this file top to bottom on every interaction. The model and the index are
loaded once per server process (`st.cache_resource`) and shared by every visitor; the index is
cached by its published version, so a new version published under the same folder (a reindex)
is served from the next interaction on, without a restart. Each tab computes only when its
button is pressed and keeps its last result in the visitor's session, so using one tab does not
clear another.

Tabs:
- Text → Image: a query, k, and the k nearest images of the index with scores and captions;
- Image → Text: an uploaded image or an index item, labels one a line and a prompt template,
  and a bar chart of the zero-shot label probabilities;
- Text → Patch: an image, a text, a grid size and the crops/tokens mode; the heat-map overlay
  and the grid cells ranked.
Bad input (an empty query, no labels, a file that is not an image) gets a message on the page
and the app carries on.

With `--service URL` (python -m koclip.app --service), the index is a `ServiceIndex`: searches
and the pickers' items go to a running `python -m koclip.serve`; the model stays local for the
zero-shot and patch tabs.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass

import streamlit as st
from PIL import Image

from koclip import fs
from koclip.errors import ImageDecodeError, KoclipError, QueryError
from koclip.app.remote import ServiceIndex, connect_service
from koclip.processing import open_image
from koclip.query import prompts

log = logging.getLogger("koclip.app")

TABS = ("Text → Image", "Image → Text", "Text → Patch")
DEFAULT_TEMPLATE = prompts.DEFAULT_TEMPLATE
DEFAULT_LABELS = "고양이\n강아지\n자동차\n사과\n꽃"
IMAGE_FORMATS = "PNG, JPEG, GIF, WebP or BMP"
GRID_COLUMNS = 4
SHOWN_CELLS = 8  # ranked grid cells shown under the heat map
PICK_LIMIT = 5000  # index items offered by the "from the index" picker
SOURCES = ("Upload", "From the index")


class InputError(KoclipError):
    """Something the visitor typed or uploaded that cannot be used; the message says how to fix it."""


# ---------------------------------------------------------------- input checks (no Streamlit)


def parse_labels(text: str) -> list[str]:
    """Labels one a line: blank lines dropped, surrounding spaces stripped, a repeated label kept once."""
    labels = []
    for line in text.splitlines():
        label = line.strip()
        if label and label not in labels:
            labels.append(label)
    if not labels:
        raise InputError("Enter at least one label, one a line (for example 고양이 and 강아지 on two lines).")
    return labels


def check_template(template: str) -> str:
    try:
        return prompts.check_template(template)
    except QueryError as e:
        raise InputError(f"{str(e)[0].upper()}{str(e)[1:]}.") from None


def check_text(text: str, what: str = "a query") -> str:
    text = text.strip()
    if not text:
        raise InputError(f"Type {what} first, in Korean or English (for example 고양이 or “a red apple”).")
    return text


def decode_upload(name: str, data: bytes) -> Image.Image:
    """The uploaded file as an RGB image, or an InputError naming the file and the reason."""
    try:
        return open_image(data)
    except ImageDecodeError as e:
        raise InputError(f"{name} is not an image this app can read ({e.message}). "
                         f"Upload a {IMAGE_FORMATS} file.") from None


# ---------------------------------------------------------------- resources (once per process)


@dataclass(frozen=True)
class Item:
    """An index entry as the pickers show it."""

    id: str
    uri: str
    caption: str

    def label(self) -> str:
        return f"{self.caption} ({self.id})" if self.caption else self.id


@st.cache_resource(show_spinner="Loading the model…")
def load_model(path: str):
    from koclip.query import load_model

    log.info("loading model from %s", path)
    return load_model(path)


def current_version(path: str) -> str:
    """The version folder the index's CURRENT pointer names now (one small read per page run)."""
    from koclip.index import resolve_version

    return resolve_version(path)


@st.cache_resource(show_spinner="Loading the index…", max_entries=2)
def load_index(version: str):
    from koclip.index import load_index

    log.info("loading index from %s", version)
    return load_index(version)


@st.cache_resource(show_spinner=False, max_entries=2)
def index_items(version: str) -> list[Item]:
    """The first PICK_LIMIT items of the index, for the pickers."""
    import numpy as np

    index = load_index(version)
    records = index.records(np.arange(min(len(index), PICK_LIMIT)))
    return [Item(str(r["id"]), str(r["uri"]), (list(r["captions"] or []) or [""])[0]) for r in records]


@st.cache_data(max_entries=1024, show_spinner=False)
def read_image(uri: str) -> bytes | None:
    """The bytes of an index image, or None when it cannot be read (shown as a note, not an error)."""
    try:
        return fs.read_bytes(uri)
    except Exception as e:  # a moved or unreadable image must not break the results grid
        log.warning("cannot read %s: %s", uri, e)
        return None


@st.cache_resource(show_spinner=False, max_entries=2, ttl=60)
def service_items(index: ServiceIndex) -> list[Item]:
    """The first PICK_LIMIT items of the service's index (row numbers through /metadata)."""
    found = index.client().metadata(list(range(min(len(index), PICK_LIMIT))))
    return [Item(str(meta.get("item_id") or row), str(meta["url"]), str(meta.get("caption") or ""))
            for row, meta in found.items() if meta]


def run(compute):
    """A call into koclip.query (or the service); what it refuses becomes an InputError with its
    message, anything else is logged and reported on the page, so one bad request never takes
    the app down."""
    from koclip.client import ServiceError

    try:
        return compute()
    except (QueryError, ImageDecodeError, ServiceError) as e:
        raise InputError(str(e)) from None
    except Exception as e:
        log.exception("request failed")
        raise InputError(f"The request failed ({type(e).__name__}: {e}); the server log has the details.") from None


# ---------------------------------------------------------------- tabs


def image_source(key: str, items: list[Item]) -> Image.Image | None:
    """An image uploaded or picked from the index, with a preview; None (and a message) when there is none."""
    source = st.radio("Image", SOURCES, index=1, horizontal=True, key=f"{key}_source")
    if source == "Upload":
        upload = st.file_uploader(f"Image file ({IMAGE_FORMATS})", key=f"{key}_upload")
        if upload is None:
            st.info("Choose an image file to upload.")
            return None
        try:
            image = decode_upload(upload.name, upload.getvalue())
        except InputError as e:
            st.error(str(e))
            return None
        caption = upload.name
    else:
        if not items:
            st.warning("The index has no items to pick from; upload an image instead.")
            return None
        item = st.selectbox("Index item", items, key=f"{key}_item", format_func=Item.label)
        data = read_image(item.uri)
        try:
            image = decode_upload(item.uri, data) if data is not None else None
        except InputError as e:
            st.error(str(e))
            return None
        if image is None:
            st.error(f"Cannot read the image of {item.id} at {item.uri}.")
            return None
        caption = item.label()
    st.image(image, width=224, caption=caption)
    return image


def text_to_image_tab(index, model) -> None:
    with st.form("search_form"):
        text = st.text_input("Query", placeholder="소파 위에 고양이")
        k = st.slider("Results (k)", min_value=1, max_value=48, value=12)
        submitted = st.form_submit_button("Search", type="primary")
    if submitted:
        st.session_state.pop("search", None)
        try:
            text = check_text(text)
            st.session_state["search"] = (text, run(lambda: search(text, k, index, model)))
        except InputError as e:
            st.warning(str(e))
    if "search" not in st.session_state:
        return
    text, hits = st.session_state["search"]
    st.caption(f"{len(hits)} nearest images for “{text}”, with their cosine similarity")
    for start in range(0, len(hits), GRID_COLUMNS):
        for column, hit in zip(st.columns(GRID_COLUMNS), hits[start:start + GRID_COLUMNS]):
            with column:
                caption = f"{hit.rank}. {' / '.join(hit.captions) or hit.id} · {hit.score:.3f}"
                data = read_image(hit.uri)
                if data is None:
                    st.warning(f"{caption}: no image at {hit.uri}")
                else:
                    st.image(data, caption=caption, width="stretch")


def image_to_text_tab(items: list[Item], model) -> None:
    left, right = st.columns([2, 3])
    with left:
        image = image_source("classify", items)
    with right, st.form("classify_form"):
        labels_text = st.text_area("Labels (one a line)", value=DEFAULT_LABELS, height=150)
        template = st.text_input("Template", value=DEFAULT_TEMPLATE,
                                 help="Each label takes the place of {}; the sentences are compared with the image.")
        submitted = st.form_submit_button("Classify", type="primary")
    if submitted:
        st.session_state.pop("classify", None)
        try:
            if image is None:
                raise InputError("Choose an image first: upload one or pick one from the index.")
            labels = parse_labels(labels_text)
            template = check_template(template)
            st.session_state["classify"] = run(lambda: classify(image, labels, template, model))
        except InputError as e:
            st.error(str(e))
    if "classify" in st.session_state:
        probability_chart(st.session_state["classify"])


def probability_chart(ranked: list[tuple[str, float]]) -> None:
    """A horizontal bar per label, most likely on top, and the winner in words."""
    import altair as alt
    import pandas as pd

    table = pd.DataFrame(ranked, columns=["label", "probability"])
    best_label, best_probability = ranked[0]
    st.markdown(f"Most likely: **{best_label}** ({best_probability:.1%})")
    bars = alt.Chart(table).mark_bar().encode(
        x=alt.X("probability:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"), title="probability"),
        y=alt.Y("label:N", sort="-x", title=None),
        tooltip=["label", alt.Tooltip("probability:Q", format=".1%")],
    )
    st.altair_chart(bars, width="stretch")


def text_to_patch_tab(items: list[Item], model) -> None:
    left, right = st.columns([2, 3])
    with left:
        image = image_source("patch", items)
    with right, st.form("patch_form"):
        text = st.text_input("Text", placeholder="고양이")
        grid = st.slider("Grid (n × n cells)", min_value=2, max_value=8, value=3)
        mode = st.radio("Mode", ("crops", "tokens"), horizontal=True,
                        help="crops: each grid cell is embedded as an image of its own (the KoCLIP demo); "
                             "tokens: one pass over the whole image, its patch tokens pooled per cell.")
        submitted = st.form_submit_button("Rank patches", type="primary")
    if submitted:
        st.session_state.pop("patch", None)
        try:
            if image is None:
                raise InputError("Choose an image first: upload one or pick one from the index.")
            text = check_text(text, "a text")
            st.session_state["patch"] = run(lambda: rank_patches(text, image, grid, mode, model))
        except InputError as e:
            st.error(str(e))
    if "patch" not in st.session_state:
        return
    ranking = st.session_state["patch"]
    left, right = st.columns([2, 3])
    with left:
        rows, cols = ranking.grid
        st.image(ranking.overlay(), width="stretch",
                 caption=f"“{ranking.text}”: {rows}×{cols} cells by {ranking.mode}, hottest = best")
    with right:
        st.caption("Cells, best first (rank · cosine similarity)")
        cells = ranking.cells()[:SHOWN_CELLS]
        for start in range(0, len(cells), GRID_COLUMNS):
            for column, cell in zip(st.columns(GRID_COLUMNS), cells[start:start + GRID_COLUMNS]):
                with column:
                    st.image(ranking.image.crop(tuple(cell["box"])), width="stretch",
                             caption=f"{cell['rank']} · {cell['score']:.3f}")


# ---------------------------------------------------------------- the query library


def search(text, k, index, model):
    if isinstance(index, ServiceIndex):
        return index.search(text, k)
    from koclip.query import search

    return search(text, k=k, index=index, model=model)


def classify(image, labels, template, model):
    from koclip.query import classify

    return classify(image, labels, template=template, model=model)


def rank_patches(text, image, grid, mode, model):
    from koclip.query import rank_patches

    return rank_patches(text, image, grid=(grid, grid), mode=mode, model=model)


# ---------------------------------------------------------------- page


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="koclip/apps/page.py", description="started by python -m koclip.app")
    parser.add_argument("--index", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--service", default=None)
    parser.add_argument("--service-index", default=None)
    return parser.parse_args(argv)


def home_relative(path: str) -> str:
    """A local path under the home folder as ~/...; anything else as it is."""
    home = os.path.expanduser("~")
    return "~" + path[len(home):] if "://" not in path and path.startswith(home + os.sep) else path


def main(argv: list[str]) -> None:
    st.set_page_config(page_title="KoCLIP demo", page_icon="🔎", layout="wide")
    args = parse_args(argv)
    try:
        model = load_model(args.model)
        if args.service:
            index = run(lambda: connect_service(args.service, args.service_index))
            version = f"{args.service} {index.name} {index.version}"
            items = run(lambda: service_items(index))
        else:
            version = current_version(args.index)
            index = load_index(version)
            items = index_items(version)
        run(lambda: check_compatible(index, model))
    except Exception as e:
        log.exception("cannot serve %s with %s", args.service or args.index, args.model)
        st.error(f"Cannot serve this index with this model: {e}")
        st.stop()

    st.title("KoCLIP demo")
    with st.sidebar:
        st.subheader("Serving")
        st.markdown(f"**Index** `{home_relative(version)}`  \n{len(index):,} items")
        st.markdown(f"**Model** `{home_relative(args.model)}`  \nfingerprint `{model.fingerprint}`")

    text_tab, image_tab, patch_tab = st.tabs(TABS)
    with text_tab:
        text_to_image_tab(index, model)
    with image_tab:
        image_to_text_tab(items, model)
    with patch_tab:
        text_to_patch_tab(items, model)


def check_compatible(index, model) -> None:
    from koclip.query import check_compatible

    check_compatible(index, model)


if __name__ == "__main__":
    main(sys.argv[1:])
