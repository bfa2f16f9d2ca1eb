"""URI lists (`capworks enqueue @FILE`): blanks and comments skipped, resumable by line number,
and counted the same way for the progress bar's ETA."""

from __future__ import annotations

from pathlib import Path

from capworks.producer.sources import count_uri_file, iter_uri_file


def test_a_uri_list_skips_blanks_and_comments_and_resumes_by_line(tmp_path: Path) -> None:
    listing = tmp_path / "uris.txt"
    listing.write_text("s3://b/a.jpg\n\n  # a comment\n  s3://b/c d.jpg  \n#x\n/data/e.png\n")
    every = [(pos, ref.uri) for pos, ref in iter_uri_file(listing)]
    assert every == [("1", "s3://b/a.jpg"), ("4", "s3://b/c d.jpg"), ("6", "/data/e.png")]
    assert [ref.uri for _, ref in iter_uri_file(listing, start_after="4")] == ["/data/e.png"]
    assert count_uri_file(listing) == len(every)


def test_a_uri_list_with_bytes_that_are_not_utf8_is_read_to_the_end(tmp_path: Path) -> None:
    listing = tmp_path / "uris.txt"
    listing.write_bytes(b"s3://b/a.jpg\ns3://b/caf\xe9.jpg\ns3://b/z.jpg\n")
    uris = [ref.uri for _, ref in iter_uri_file(listing)]
    # The bad bytes survive as surrogate escapes, for the crawl to record and skip that line.
    assert uris == ["s3://b/a.jpg", "s3://b/caf\udce9.jpg", "s3://b/z.jpg"]
    assert uris[1].encode("utf-8", "surrogateescape") == b"s3://b/caf\xe9.jpg"
    assert count_uri_file(listing) == 3


def test_a_file_gone_since_its_folder_was_listed_gets_a_bare_reference(tmp_path: Path) -> None:
    from capworks.producer.sources import local_ref

    ref = local_ref(tmp_path / "gone.png")
    assert (ref.uri, ref.etag, ref.size_bytes) == (
        str((tmp_path / "gone.png").resolve()),
        None,
        None,
    )
