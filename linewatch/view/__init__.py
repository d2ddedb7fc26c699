"""``linewatch view``: a live, read-only web page of every camera, its rejects and its drift.

A process of its own: :mod:`linewatch.view.hub` reads the verdict stream like any subscriber (previews
included) and keeps a bounded state per camera; :mod:`linewatch.view.app` serves it (Starlette + uvicorn)
with server-sent events to the page in ``static/``. See docs/view.md.
"""
