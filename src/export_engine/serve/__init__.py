"""``export-engine serve``: artifacts behind an HTTP service (FastAPI + uvicorn, the ``[serve]`` extra) and a web
viewer at ``/``.

- :mod:`.app` builds the FastAPI application (errors as 4xx with a message, the page, /health, /metrics);
  :mod:`.routes` holds the API's routes, :mod:`.middleware` the body limit and request metrics, :mod:`.state`
  what every request shares.
- :mod:`.store` holds FastSAM3D sessions in an LRU bounded by device memory, with expiry.
- :mod:`.uploads` reads uploaded volumes and writes masks (NIfTI, .npy), with size limits.
- :mod:`.client` is a small Python client of the same API (standard library only).
- :mod:`.server` runs the app under uvicorn (the CLI's entry point, and tests' local servers).
- :mod:`.ray_serve` deploys the app on Ray Serve (``serve --ray``): one replica per GPU, a router that keeps
  each session on the replica holding it.

fastapi, uvicorn and ray are imported when an app is built or deployed, never at package import.
"""
