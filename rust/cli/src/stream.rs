//! Turning generated token ids into printable text while they arrive.
//!
//! Two small state machines, both independent of the tokenizer (they take a `decode` closure)
//! so they can be tested on plain bytes:
//! - [`IncrementalDetokenizer`] never emits half a UTF-8 character: byte-level BPE tokens may
//!   each hold part of a multi-byte character, and decoding such a prefix ends in U+FFFD.
//! - [`StopFilter`] cuts the text right before the earliest stop string and holds back any tail
//!   that could still become one.
//!
//! Both mirror `IncrementalDetokenizer` / `StopStringFilter` of `python/sparselm/generation.py`
//! so the native and the Python CLI print the same text. Lengths are compared in characters, as
//! in Python; nothing here slices a string at a position that is not a character boundary.

const REPLACEMENT: char = '\u{FFFD}';

/// Ids → text pieces, one `push` per id, never splitting a character.
///
/// The offset scheme of text-generation-inference: decode a short window (the ids since the last
/// clean boundary plus the new ones) and emit only the text past the already-emitted part, and
/// only when it does not end with U+FFFD. For byte-level BPE the concatenated pieces equal a
/// one-shot decode of all ids.
#[derive(Debug, Default)]
pub struct IncrementalDetokenizer {
    ids: Vec<u32>,
    /// Start of the decode window.
    prefix_offset: usize,
    /// Ids before this one were emitted.
    read_offset: usize,
}

impl IncrementalDetokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one id; return the newly complete text (possibly empty).
    pub fn push<E>(
        &mut self,
        id: u32,
        decode: &mut impl FnMut(&[u32]) -> Result<String, E>,
    ) -> Result<String, E> {
        self.ids.push(id);
        self.advance(false, decode)
    }

    /// Return any text still held back (an incomplete character at the very end then shows as
    /// U+FFFD, exactly as a one-shot decode shows it).
    pub fn flush<E>(
        &mut self,
        decode: &mut impl FnMut(&[u32]) -> Result<String, E>,
    ) -> Result<String, E> {
        self.advance(true, decode)
    }

    fn advance<E>(
        &mut self,
        last: bool,
        decode: &mut impl FnMut(&[u32]) -> Result<String, E>,
    ) -> Result<String, E> {
        if self.read_offset >= self.ids.len() {
            return Ok(String::new());
        }
        let prefix_text = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let new_text = decode(&self.ids[self.prefix_offset..])?;
        let n_prefix = prefix_text.chars().count();
        if new_text.chars().count() > n_prefix && (last || !new_text.ends_with(REPLACEMENT)) {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Ok(match new_text.strip_prefix(prefix_text.as_str()) {
                Some(rest) => rest.to_string(),
                None => new_text.chars().skip(n_prefix).collect(),
            });
        }
        if last {
            self.read_offset = self.ids.len();
        }
        Ok(String::new())
    }
}

/// Cut a text stream right before the earliest stop string.
///
/// `push` returns the text that is safe to emit: text that is not, and cannot become, part of a
/// stop string. A tail that could be the start of a stop string is held back until the next
/// piece decides it. Once a stop string has appeared, `stopped()` is true and every later `push`
/// returns "". `flush` releases the held-back text when the stream ends without a stop string.
#[derive(Debug)]
pub struct StopFilter {
    stops: Vec<String>,
    /// Longest tail (bytes) that can be held back: the longest stop string minus one byte.
    max_hold: usize,
    pending: String,
    matched: Option<usize>,
}

impl StopFilter {
    /// `stops` must not contain empty strings (the argument parser rejects them).
    pub fn new(stops: &[String]) -> Self {
        let stops: Vec<String> = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        let max_hold = stops
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        StopFilter {
            stops,
            max_hold,
            pending: String::new(),
            matched: None,
        }
    }

    /// True once a stop string has appeared.
    pub fn stopped(&self) -> bool {
        self.matched.is_some()
    }

    /// The stop string that ended the stream, if any.
    #[cfg(test)]
    pub fn matched(&self) -> Option<&str> {
        self.matched.map(|i| self.stops[i].as_str())
    }

    /// Add a piece of text; return the part that can be emitted now.
    pub fn push(&mut self, text: &str) -> String {
        if self.stopped() || text.is_empty() {
            return String::new();
        }
        if self.stops.is_empty() {
            return text.to_string();
        }
        let mut buf = std::mem::take(&mut self.pending);
        buf.push_str(text);
        // Earliest occurrence over all stop strings (ties: the longest string, deterministic).
        let mut best: Option<(usize, usize)> = None;
        for (k, s) in self.stops.iter().enumerate() {
            if let Some(at) = buf.find(s.as_str()) {
                let better = match best {
                    None => true,
                    Some((b_at, b_k)) => {
                        at < b_at || (at == b_at && s.len() > self.stops[b_k].len())
                    }
                };
                if better {
                    best = Some((at, k));
                }
            }
        }
        if let Some((at, k)) = best {
            self.matched = Some(k);
            buf.truncate(at);
            return buf;
        }
        let keep = self.held_suffix_start(&buf);
        self.pending = buf.split_off(keep);
        buf
    }

    /// Release the held-back text (call when the stream ends without a stop string).
    pub fn flush(&mut self) -> String {
        let out = std::mem::take(&mut self.pending);
        if self.stopped() {
            String::new()
        } else {
            out
        }
    }

    /// Start of the longest suffix of `buf` that is a proper prefix of some stop string
    /// (`buf.len()` when there is none). Always a character boundary.
    fn held_suffix_start(&self, buf: &str) -> usize {
        let min_start = buf.len().saturating_sub(self.max_hold);
        buf.char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i >= min_start)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&buf[i..])))
            .unwrap_or(buf.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level "tokenizer": id = byte value; decoding is lossy UTF-8, like the ByteLevel
    /// decoder. Ids >= 256 are specials that decode to nothing (skip_special_tokens).
    fn decode(ids: &[u32]) -> Result<String, ()> {
        let bytes: Vec<u8> = ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn stream_bytes(bytes: &[u8]) -> Vec<String> {
        let mut d = IncrementalDetokenizer::new();
        let mut pieces: Vec<String> = bytes
            .iter()
            .map(|&b| d.push(b as u32, &mut decode).unwrap())
            .collect();
        pieces.push(d.flush(&mut decode).unwrap());
        pieces
    }

    #[test]
    fn ascii_streams_one_piece_per_token() {
        let pieces = stream_bytes(b"hello");
        assert_eq!(pieces, ["h", "e", "l", "l", "o", ""]);
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let text = "aé€😀z";
        let pieces = stream_bytes(text.as_bytes());
        for p in &pieces {
            assert!(!p.contains(REPLACEMENT), "{pieces:?}");
        }
        assert_eq!(pieces.concat(), text);
        // é is 2 bytes: its first byte yields nothing, the second the whole character.
        assert_eq!(&pieces[1..3], ["", "é"]);
        // 😀 is 4 bytes.
        assert_eq!(&pieces[6..10], ["", "", "", "😀"]);
    }

    #[test]
    fn truncated_character_shows_at_flush() {
        let mut bytes = b"ok ".to_vec();
        bytes.extend_from_slice(&"€".as_bytes()[..2]);
        let pieces = stream_bytes(&bytes);
        assert_eq!(pieces.concat(), String::from_utf8_lossy(&bytes));
        assert_eq!(pieces.last().unwrap(), "\u{FFFD}");
    }

    #[test]
    fn invalid_byte_mid_stream_does_not_block_forever() {
        // A lone continuation byte decodes to U+FFFD; the following ASCII releases it.
        let bytes = [b'a', 0x80, b'b', b'c'];
        let pieces = stream_bytes(&bytes);
        assert_eq!(pieces.concat(), String::from_utf8_lossy(&bytes));
        assert_eq!(pieces[2], "\u{FFFD}b");
    }

    #[test]
    fn specials_decode_to_nothing() {
        let mut d = IncrementalDetokenizer::new();
        let mut out = String::new();
        for id in [b'a' as u32, 300, 301, b'b' as u32] {
            out += &d.push(id, &mut decode).unwrap();
        }
        out += &d.flush(&mut decode).unwrap();
        assert_eq!(out, "ab");
    }

    #[test]
    fn decode_errors_propagate() {
        let mut d = IncrementalDetokenizer::new();
        let mut failing = |_: &[u32]| -> Result<String, &'static str> { Err("boom") };
        assert_eq!(d.push(1, &mut failing), Err("boom"));
    }

    fn run_filter(stops: &[&str], pieces: &[&str]) -> (Vec<String>, String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut f = StopFilter::new(&stops);
        let mut out: Vec<String> = pieces.iter().map(|p| f.push(p)).collect();
        out.push(f.flush());
        let all = out.concat();
        (out, all, f.stopped())
    }

    #[test]
    fn no_stops_passes_through() {
        let (out, all, stopped) = run_filter(&[], &["a", "b"]);
        assert_eq!(out, ["a", "b", ""]);
        assert_eq!(all, "ab");
        assert!(!stopped);
    }

    #[test]
    fn cuts_exactly_before_the_stop_string() {
        let (_, all, stopped) = run_filter(&["END"], &["hello E", "N", "D and more"]);
        assert_eq!(all, "hello ");
        assert!(stopped);
        let (_, all, _) = run_filter(&["\n\n"], &["line one\n", "\nline two"]);
        assert_eq!(all, "line one");
    }

    #[test]
    fn holds_back_only_possible_prefixes() {
        let (out, all, stopped) = run_filter(&["END"], &["the E", "ND"]);
        assert_eq!(out[0], "the ", "'E' may start END: held back");
        assert_eq!(all, "the ");
        assert!(stopped);
        let (out, all, stopped) = run_filter(&["END"], &["the E", "gg"]);
        assert_eq!(out, ["the ", "Egg", ""]);
        assert_eq!(all, "the Egg");
        assert!(!stopped);
        // A held prefix is released at the end of the stream.
        let (out, all, _) = run_filter(&["END"], &["stop EN"]);
        assert_eq!(out, ["stop ", "EN"]);
        assert_eq!(all, "stop EN");
    }

    #[test]
    fn earliest_then_longest_stop_wins() {
        let (_, all, _) = run_filter(&["b", "abc"], &["xxabcd"]);
        assert_eq!(all, "xx", "abc starts before b");
        let stops = ["ab".to_string(), "abc".to_string()];
        let mut f = StopFilter::new(&stops);
        assert_eq!(f.push("zabc"), "z");
        assert_eq!(f.matched(), Some("abc"), "same start: the longer one");
    }

    #[test]
    fn after_a_stop_nothing_more() {
        let stops = ["X".to_string()];
        let mut f = StopFilter::new(&stops);
        assert_eq!(f.push("aXb"), "a");
        assert_eq!(f.push("more"), "");
        assert_eq!(f.flush(), "");
    }

    #[test]
    fn multibyte_stop_strings_and_text() {
        let (out, all, stopped) = run_filter(&["é!"], &["caf", "é", "!", "x"]);
        assert_eq!(all, "caf");
        assert!(stopped);
        assert_eq!(out[1], "", "é may start the stop string");
        // Hold-back of a multibyte tail never splits a character.
        let (_, all, stopped) = run_filter(&["😀😀"], &["a😀", "b"]);
        assert_eq!(all, "a😀b");
        assert!(!stopped);
    }

    #[test]
    fn stop_spanning_many_pieces() {
        let pieces: Vec<String> = "one <|end|> two".chars().map(String::from).collect();
        let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
        let (_, all, stopped) = run_filter(&["<|end|>"], &refs);
        assert_eq!(all, "one ");
        assert!(stopped);
    }

    #[test]
    fn detokenizer_and_filter_together() {
        let text = "Grüße, 世界! STOP rest";
        let stops = ["STOP".to_string()];
        let mut d = IncrementalDetokenizer::new();
        let mut f = StopFilter::new(&stops);
        let mut out = String::new();
        for &b in text.as_bytes() {
            let piece = d.push(b as u32, &mut decode).unwrap();
            assert!(!piece.contains(REPLACEMENT));
            out += &f.push(&piece);
            if f.stopped() {
                break;
            }
        }
        assert_eq!(out, "Grüße, 世界! ");
    }
}
