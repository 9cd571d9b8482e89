"""Node configuration, bottom layer: errors, schema, grammar, checks, keys, section, readers, loader
(each module imports only those before it), and sshoptions + agentargs (ssh's flags)."""
