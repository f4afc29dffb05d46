"""`plvmctl serve`: an OpenAI-compatible HTTP API over the engine, for many users at once.

settings.py (the recipe's `serve:` section), users.py (API keys and per-user stores),
photos.py (image parts → photos), chat.py (the chat-completions request and response
shapes), batcher.py (one model worker thread gathering concurrent requests into batches),
faults.py (OpenAI-style error objects) and app.py (the FastAPI routes). Only app.py imports
FastAPI, an optional extra (`pip install -e ".[serve]"`).
"""
