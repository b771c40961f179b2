"""Messages both sides import: simulator tasks/results, HTTP wire types, secure-aggregation messages, request signing."""
