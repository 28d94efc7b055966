"""The Urza service's kernel-name routes: aliases set, moved and listed, and names resolved.

==============================  ================================================================
``PUT /aliases/{name}``          tag a kernel (``{"kernel_id": …, "move": false}``); 409 if the
                                 alias names another kernel and ``move`` is false
``GET /aliases``                 aliases in name order (``kernel_id``, ``limit``, ``offset``)
``GET /resolve?name=…``          the kernel id a name (id, unique id prefix, alias) stands for;
                                 404 naming the name when nothing matches, 409 when ambiguous
==============================  ================================================================

Names are checked against their forms before the library sees them (422 otherwise).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Path, Query

from esper.contracts import KernelAlias
from esper.contracts.kernel_aliases import ALIAS_PATTERN, MAX_ALIAS_CHARS
from esper.urza.api_models import AliasRequest, PageLimit, PageOffset, ResolvedName
from esper.urza.library import ArtifactLibrary
from esper.urza.pagination import MAX_PAGE_SIZE

_ALIAS = f"^{ALIAS_PATTERN.pattern}$"
AliasPath = Annotated[
    str, Path(pattern=_ALIAS, max_length=MAX_ALIAS_CHARS, description="an alias name")
]
NameQuery = Annotated[
    str,
    Query(
        pattern=_ALIAS,
        max_length=max(MAX_ALIAS_CHARS, 64),
        description="a kernel id, a unique id prefix (6+ hex digits) or an alias",
    ),
]
KernelIdQuery = Annotated[str | None, Query(pattern=r"^[0-9a-f]{64}$")]


def add_alias_routes(app: FastAPI, library: ArtifactLibrary, authorized: list[Any]) -> None:
    """Serve ``library``'s kernel names on ``app`` (each route depends on ``authorized``)."""

    @app.put("/aliases/{name}", tags=["kernels"], dependencies=authorized)
    def tag_kernel(name: AliasPath, body: AliasRequest) -> KernelAlias:
        """Make the alias ``name`` name a kernel (moved only with ``move: true``)."""
        return library.tag_kernel(name, body.kernel_id, move=body.move)

    @app.get("/aliases", tags=["kernels"], dependencies=authorized)
    def list_aliases(
        kernel_id: KernelIdQuery = None,
        limit: Annotated[PageLimit, Query()] = MAX_PAGE_SIZE,
        offset: Annotated[PageOffset, Query()] = 0,
    ) -> list[KernelAlias]:
        """Aliases in name order (one page)."""
        return library.list_aliases(kernel_id=kernel_id, limit=limit, offset=offset)

    @app.get("/resolve", tags=["kernels"], dependencies=authorized)
    def resolve_kernel(name: NameQuery) -> ResolvedName:
        """The kernel id that a name stands for."""
        return ResolvedName(name=name, kernel_id=library.resolve_kernel(name))
