from smolvlm.engine.text_stream import IncrementalDetokenizer, StopStringMatcher


def _byte_decode(ids):
    return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_detokenizer_never_splits_a_character():
    data = "héllo 🌍 wörld".encode()
    det = IncrementalDetokenizer(_byte_decode)
    pieces = [det.push(b) for b in data] + [det.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "héllo 🌍 wörld"


def test_stop_string_is_never_leaked_across_pieces():
    m = StopStringMatcher(["</s>", "END"])
    out = "".join(m.feed(p) for p in ["Hello </", "world </", "s> tail"])
    assert out == "Hello </world " and m.stopped
    assert m.feed("more") == "" and m.flush() == ""


def test_stop_string_completed_by_a_later_piece():
    m = StopStringMatcher(["END"])
    assert m.feed("the EN") == "the "
    assert m.feed("D") == "" and m.stopped


def test_held_prefix_released_at_flush():
    m = StopStringMatcher(["END"])
    assert m.feed("almost E") == "almost "
    assert m.flush() == "E"


def test_no_stops_passes_through():
    m = StopStringMatcher([])
    assert m.feed("abc") == "abc"
