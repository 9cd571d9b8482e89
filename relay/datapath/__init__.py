"""Moving bytes: the flow-controlled bridge, splice backends and the cffi glue."""
