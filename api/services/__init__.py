"""What the API does, as plain async functions over typed inputs: accept, read, cancel, retry,
reschedule emails; templates; users and keys; sender settings; stats.

The REST routes call these, and so will every other front door (GraphQL): no rule is written
twice. They take a `Context` (who calls, and the parts they work with) and the request's typed
input (the pydantic models in `api.schemas`), return records or answers, and raise the errors of
`api.services.errors`, which each front door maps to its own terms (HTTP: 404, 409, 422).
"""
