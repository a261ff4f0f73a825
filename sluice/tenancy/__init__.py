"""Hosting many tenants' functions on one pipeline: fair shares between tenants and their
functions, a limiter per function, and a function that hurts its neighbours moved to a
dedicated queue (and back) automatically. See docs/tenancy.md."""
