"""Running a node: status and the admin endpoint, logging, the service tree, twistd glue."""
