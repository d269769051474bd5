"""Request and response bodies of the HTTP API, one module per resource, with field-level validation.

They are also the services' typed inputs (`api.services`): a front door that is not REST builds
the same models, and so gets the same checks.
"""
