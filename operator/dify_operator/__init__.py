"""The dify-mirror operator: kopf handlers that keep Ray Serve equal to the custom resources.

It reuses `dify_serving.specs`, `render` and `control`, and never imports torch,
transformers or the engines (small image, fast start). Run it with
`python -m dify_operator`.
"""
