"""A rank outlives its console: output to a console that went away goes to /dev/null, other write errors still raise.
A rank stuck in a block says where it is."""

import io
import os
import time

import pytest

from lance_ds.processes import LosableConsole, said_if_slow


def text_stream(fd: int) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BufferedWriter(io.FileIO(fd, "w")), line_buffering=True)


def test_a_console_without_reader_goes_to_devnull_and_writing_goes_on():
    read, write = os.pipe()
    console = LosableConsole(text_stream(write))
    console.write("seen\n")
    assert os.read(read, 100) == b"seen\n"
    os.close(read)  # the ssh session / launcher reading the rank's output is gone
    assert console.write("a progress bar update\n") == len("a progress bar update\n")
    console.write("x" * 100_000)
    console.flush()
    assert os.path.samefile(f"/proc/self/fd/{write}", os.devnull)  # every writer of the descriptor: logging, C code
    assert console.fileno() == write and console.encoding  # the rest is the stream's
    console.close()


def test_other_write_errors_are_not_swallowed():
    full = os.open("/dev/full", os.O_WRONLY)  # ENOSPC: a disk that filled up is the user's to hear about
    console = LosableConsole(text_stream(full))
    with pytest.raises(OSError, match="No space left"):
        console.write("a line\n")


def test_a_block_that_runs_long_says_where_every_thread_is(capfd):
    with said_if_slow("step 7", 0.2, "a test"):
        time.sleep(0.6)
    said = capfd.readouterr().err
    assert said.startswith("lance_ds: rank 0: step 7 has run 0.2 s (a test); where this rank's threads are:"), said
    assert "in test_a_block_that_runs_long_says_where_every_thread_is" in said  # the stuck (main) thread's frames
    with said_if_slow("step 8", 0.5, "a test"):
        pass
    time.sleep(0.7)
    assert capfd.readouterr().err == ""  # a block that ended in time says nothing
