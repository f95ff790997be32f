"""HTTP, scheduling and the Serve deployments: the only package that imports ray.serve."""

from app.builder import BuilderArgs, build_app

__all__ = ["BuilderArgs", "build_app"]
