"""HTTP, scheduling and the Serve deployments: the only package that imports ray.serve."""

__all__ = ["BuilderArgs", "build_app"]


def __getattr__(name: str):
    # `serve run`'s `app:build_app` reaches the builder (torch, transformers) through here; a
    # process that needs one light module (the registry actor, which the ingress waits for at
    # start) does not pay 4 s of imports for it.
    if name in __all__:
        from app import builder

        return getattr(builder, name)
    raise AttributeError(f"module 'app' has no attribute {name!r}")
