"""Code shared by the programs that talk to the collector: the agent and `import`.

`credentials` is the client side of the collector's security (TLS channel, bearer token,
the options that set them); `digests` is the assignment-digest contract an agent and the
collector both compute; `options` holds the command-line conventions of both programs.
Nothing here imports `agent` or `collector`, so the collector never depends on the agent.
"""
