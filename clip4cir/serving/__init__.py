"""Layer 5, serving: the app (Gradio page, named API, catalog file routes, thumbnails, uploads) and assembling its
search engine from what it is given (an index, a model, the offline demo, Hub paths)."""
