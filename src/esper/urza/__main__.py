"""Run the Urza HTTP service: ``python -m esper.urza --host 127.0.0.1 --port 8765``.

Storage URLs come from ``--metadata-url``/``--blob-url`` or ``ESPER_URZA_METADATA_URL``/
``ESPER_URZA_BLOB_URL`` (embedded defaults under ``runs/urza`` otherwise); the bearer token only
from ``ESPER_URZA_TOKEN``, so that it never shows in a process listing.
"""

from __future__ import annotations

import argparse
import logging

from esper.urza.service import serve
from esper.urza.settings import UrzaSettings


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m esper.urza", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--metadata-url", default=None)
    parser.add_argument("--blob-url", default=None)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    settings = UrzaSettings.from_env()
    overrides = {"metadata_url": args.metadata_url, "blob_url": args.blob_url}
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    serve(host=args.host, port=args.port, settings=settings, log_level=args.log_level)


if __name__ == "__main__":
    main()
