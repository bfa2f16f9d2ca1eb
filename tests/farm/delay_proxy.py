"""A delay proxy: the farm's stand-in for `tc netem delay`, which this kernel lacks (no
`sch_netem` module; no `fq` qdisc either, so no BPF departure times). It listens on the services
host in front of a server and, while holding, passes every chunk it reads on `delay_ms` later,
each way: a request and its answer take 2 x delay_ms more. Chunks keep their order and their
spacing (one is not held behind the previous one's wait): a longer link, not a slower one.

    python tests/farm/delay_proxy.py --delay-ms 25 ADDR PORT:TARGET_PORT [PORT:TARGET_PORT ...]

It starts passing chunks at once; SIGUSR1 makes it hold them, SIGUSR2 pass them at once again
(a clean and a slow run through the same proxy, its own CPU cost in both). The farm stops it by
PID with the rest of the services host.
"""

from __future__ import annotations

import argparse
import asyncio
import signal


class Link:
    """The delay every chunk gets now (0 or `delay_s`, switched by signals)."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s, self.holding = delay_s, False

    def now_s(self) -> float:
        return self.delay_s if self.holding else 0.0


async def carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link) -> None:
    """Copy one direction of a connection, each chunk released at its arrival + the delay."""
    loop = asyncio.get_running_loop()
    held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def take() -> None:
        while chunk := await reader.read(1 << 16):
            held.put_nowait((loop.time() + link.now_s(), chunk))
        held.put_nowait((loop.time() + link.now_s(), b""))

    async def release() -> None:
        while True:
            due, chunk = await held.get()
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            if not chunk:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()

    async with asyncio.TaskGroup() as both:
        both.create_task(take())
        both.create_task(release())


async def serve(addr: str, port: int, target_port: int, link: Link) -> asyncio.Server:
    async def connect(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            s_reader, s_writer = await asyncio.open_connection(addr, target_port)
        except OSError:
            c_writer.close()
            return
        try:
            async with asyncio.TaskGroup() as ways:
                ways.create_task(carry(c_reader, s_writer, link))
                ways.create_task(carry(s_reader, c_writer, link))
        except* OSError:
            pass  # one side reset: the other is closed below, as a relay's would be
        finally:
            c_writer.close()
            s_writer.close()

    return await asyncio.start_server(connect, addr, port)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("addr")
    parser.add_argument("ports", nargs="+", help="LISTEN_PORT:TARGET_PORT")
    args = parser.parse_args()
    link = Link(args.delay_ms / 1000)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: setattr(link, "holding", True))
    loop.add_signal_handler(signal.SIGUSR2, lambda: setattr(link, "holding", False))
    for pair in args.ports:
        listen, target = (int(p) for p in pair.split(":"))
        await serve(args.addr, listen, target, link)
    print(f"delay proxy: listening on {args.addr} {' '.join(args.ports)}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
