"""The control port's quart-trio app: health, metrics, admin views, the JSON proxy route."""
