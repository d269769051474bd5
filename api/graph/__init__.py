"""/graphql (strawberry): the schema with its limits, and the router the app mounts.

HTTP: POST (or GET for queries) with `Authorization: Bearer <key>`. WebSockets: graphql-transport-ws,
the key in connection_init's payload ({"Authorization": "Bearer <key>"}); a connection without a
valid key is closed with 4403 before any operation runs."""

from __future__ import annotations

import logging
from typing import Any

from graphql import FieldNode, FragmentDefinitionNode, FragmentSpreadNode, GraphQLError, InlineFragmentNode, IntValueNode
from graphql import OperationDefinitionNode, SelectionSetNode, ValidationRule, VariableNode
from graphql import GraphQLInterfaceType, GraphQLList, GraphQLNonNull, GraphQLObjectType, GraphQLSchema, get_named_type
from strawberry import Schema
from strawberry.exceptions import ConnectionRejectionError
from strawberry.extensions import AddValidationRules, DisableIntrospection, MaskErrors, QueryDepthLimiter
from strawberry.fastapi import GraphQLRouter
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL

from api.graph.context import GraphContext, bearer, context_getter
from api.graph.schema import Mutation, Query, Subscription
from api.services.emails import MAX_PAGE_SIZE
from mailqueue.config import Settings

log = logging.getLogger("mailqueue.api.graphql")

PATH = "/graphql"
# A list without `first` is guessed to hold this many items; `first` without a value (a variable): the largest page.
LIST_GUESS = 10
DEFAULT_FIRST = 20


def _unexpected(error: GraphQLError) -> bool:
    """A fault of ours (not a refusal, not a malformed query): logged with its trace, shown only as "internal error"."""
    original = error.original_error
    if original is None or isinstance(original, GraphQLError):
        return False
    log.error("graphql resolver failed at %s", ".".join(str(p) for p in error.path or ()), exc_info=original)
    return True


class _Masked(MaskErrors):
    def anonymise_error(self, error: GraphQLError) -> GraphQLError:
        masked = super().anonymise_error(error)
        masked.extensions = {"code": "INTERNAL_SERVER_ERROR"}
        return masked


class _Schema(Schema):
    def process_errors(self, errors: list[GraphQLError], execution_context: Any = None) -> None:
        """Refusals are answers, not faults: the faults were logged (with their traces) where they were masked."""


def cost_rule(max_cost: int) -> type[ValidationRule]:
    """A field costs 1; what a list holds costs `first` times (LIST_GUESS without one). Refused past `max_cost`."""

    class QueryCost(ValidationRule):
        def enter_operation_definition(self, node: OperationDefinitionNode, *_: Any) -> None:
            schema: GraphQLSchema = self.context.schema
            root = {"query": schema.query_type, "mutation": schema.mutation_type, "subscription": schema.subscription_type}[node.operation.value]
            fragments = {d.name.value: d for d in self.context.document.definitions if isinstance(d, FragmentDefinitionNode)}
            cost = _cost(node.selection_set, root, fragments, frozenset())
            if cost > max_cost:
                self.report_error(GraphQLError(
                    f"the query's estimated cost is {cost}; the limit is {max_cost} (ask for fewer fields or smaller pages)",
                    node, extensions={"code": "QUERY_TOO_COSTLY", "cost": cost, "limit": max_cost},
                ))

    return QueryCost


def _multiplier(field: FieldNode, definition: Any) -> int:
    """How many of what `field` holds: its `first`, a connection's default page, LIST_GUESS for a list, else 1."""
    for arg in field.arguments or ():
        if arg.name.value == "first":
            if isinstance(arg.value, IntValueNode):
                return max(int(arg.value.value), 1)
            return MAX_PAGE_SIZE if isinstance(arg.value, VariableNode) else DEFAULT_FIRST
    if (first := definition.args.get("first")) is not None:
        return first.default_value if isinstance(first.default_value, int) else DEFAULT_FIRST
    returns = definition.type.of_type if isinstance(definition.type, GraphQLNonNull) else definition.type
    return LIST_GUESS if isinstance(returns, GraphQLList) and field.name.value != "edges" else 1  # edges: counted by `first`


def _cost(selections: SelectionSetNode | None, parent: Any, fragments: dict[str, FragmentDefinitionNode], seen: frozenset[str]) -> int:
    if selections is None or not isinstance(parent, GraphQLObjectType | GraphQLInterfaceType):
        return 0
    total = 0
    for node in selections.selections:
        if isinstance(node, FieldNode):
            definition = parent.fields.get(node.name.value)
            if definition is None:
                continue  # __typename, or an unknown field (graphql's own rules refuse it)
            inner = _cost(node.selection_set, get_named_type(definition.type), fragments, seen)
            total += 1 + _multiplier(node, definition) * inner
        elif isinstance(node, InlineFragmentNode):
            total += _cost(node.selection_set, parent, fragments, seen)
        elif isinstance(node, FragmentSpreadNode) and node.name.value not in seen and node.name.value in fragments:
            total += _cost(fragments[node.name.value].selection_set, parent, fragments, seen | {node.name.value})
    return total


def build_schema(settings: Settings) -> Schema:
    cost = cost_rule(settings.graphql_max_cost)
    extensions: list[Any] = [  # factories: a fresh extension per operation
        lambda: QueryDepthLimiter(max_depth=settings.graphql_max_depth),  # the root's fields are depth 0
        lambda: AddValidationRules([cost]),
        lambda: _Masked(should_mask_error=_unexpected, error_message="internal error"),
    ]
    if not settings.graphql_introspection:
        extensions.append(DisableIntrospection)
    return _Schema(query=Query, mutation=Mutation, subscription=Subscription, extensions=extensions)


class _Router(GraphQLRouter[GraphContext, None]):
    async def on_ws_connect(self, context: GraphContext) -> dict[str, object] | None:  # type: ignore[override]
        """The key from connection_init's payload (or the handshake's Authorization header)."""
        params = context.connection_params if isinstance(context.connection_params, dict) else {}
        given = next((params[k] for k in ("Authorization", "authorization", "apiKey") if k in params), None)
        key = bearer(given) or bearer(context.request.headers.get("authorization"))
        await context.admit(context.request, key)
        if context.principal is None:
            raise ConnectionRejectionError({"message": str(context.refusal or "a valid API key is required")})
        return None


def graphql_router(settings: Settings) -> GraphQLRouter[GraphContext, None]:
    return _Router(
        build_schema(settings), path=PATH, context_getter=context_getter,
        graphql_ide="graphiql" if settings.graphql_ide else None,
        subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
        keep_alive=True, keep_alive_interval=15,
        include_in_schema=False,  # GraphQL describes itself (introspection, GraphiQL); the OpenAPI schema is REST's
    )
