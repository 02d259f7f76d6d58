#!/usr/bin/env python3
"""A TCP relay that delays every chunk, for the network-fault tests (this kernel has no netem).

    relay.py LISTEN_HOST:PORT TARGET_HOST:PORT DELAY_MS JITTER_MS

Bytes go through unchanged (TLS stays end to end); each chunk read is written after
DELAY_MS +- JITTER_MS, in order per direction. Prints "listening" once bound. Runs until killed.
"""
import asyncio
import random
import sys


async def pump(reader, writer, delay, jitter):
    queue = asyncio.Queue()

    async def later():
        while True:
            due, data = await queue.get()
            wait = due - asyncio.get_running_loop().time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                break
            writer.write(data)
            await writer.drain()
        try:
            writer.write_eof()
        except (OSError, RuntimeError):
            pass

    task = asyncio.create_task(later())
    last = 0.0
    try:
        while True:
            data = await reader.read(65536)
            now = asyncio.get_running_loop().time()
            # Never reorder: a chunk is due no earlier than the one before it.
            due = max(last, now + max(0.0, delay + random.uniform(-jitter, jitter)))
            last = due
            await queue.put((due, data or None))
            if not data:
                break
    except (ConnectionError, OSError):
        await queue.put((0.0, None))
    try:
        await task
    except (ConnectionError, OSError):
        pass


async def main():
    listen, target, delay_ms, jitter_ms = sys.argv[1:5]
    lhost, lport = listen.rsplit(":", 1)
    thost, tport = target.rsplit(":", 1)
    delay, jitter = float(delay_ms) / 1000, float(jitter_ms) / 1000

    async def handle(creader, cwriter):
        try:
            ureader, uwriter = await asyncio.open_connection(thost, int(tport))
        except OSError:
            cwriter.close()
            return
        await asyncio.gather(
            pump(creader, uwriter, delay, jitter),
            pump(ureader, cwriter, delay, jitter),
            return_exceptions=True,
        )
        for w in (cwriter, uwriter):
            w.close()

    server = await asyncio.start_server(handle, lhost, int(lport))
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
