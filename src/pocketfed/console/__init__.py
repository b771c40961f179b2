"""The operator's console: a live web page over a running coordinator (`routes.mount_console`,
served at /console) and the same charts over simulation run folders (`pocketfed console runs/`).
`views` builds the JSON the pages draw; the operator's actions are `pocketfed.server.operations`.
"""
