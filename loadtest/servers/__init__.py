"""The same ETA pipeline served other ways, for the side-by-side benchmark (`make bench`)."""


async def lifespan(receive, send) -> None:
    """Answer an ASGI server's start-up and shut-down messages (the bare ASGI apps here have no state)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
