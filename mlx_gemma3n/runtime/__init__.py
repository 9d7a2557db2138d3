"""Running the model for callers: the engine (one generation thread per model), generation,
chat sessions and attachments."""
