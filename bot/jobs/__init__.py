"""Jobs past one process: the Redis Streams transport (`QUEUE_URL`), the frontend that
enqueues, the worker that consumes, and the state they share through Redis.

Nothing here is imported when `QUEUE_URL` is unset: the bot then runs as one process
with its in-process queue, exactly as before.
"""
