"""The offline kiosk server: OpenAI's HTTP API and a chat page for one model (the optional `server` extra)."""
