//! A strict reader of the safetensors format (8-byte little-endian header length, JSON header
//! `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the data).
//!
//! Written here rather than delegated so every rejection names the file and the tensor. All
//! arithmetic on sizes is checked; nothing from the file can make us read out of bounds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// Header sizes above this are rejected (real headers are a few hundred KB).
const MAX_HEADER: u64 = 100 << 20;

/// A tensor element type as named in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StDtype {
    F32,
    F16,
    BF16,
    /// Any other dtype: its name and element size in bytes, when known.
    Other(String, Option<usize>),
}

impl StDtype {
    fn parse(s: &str) -> StDtype {
        match s {
            "F32" => StDtype::F32,
            "F16" => StDtype::F16,
            "BF16" => StDtype::BF16,
            "F64" | "I64" | "U64" => StDtype::Other(s.into(), Some(8)),
            "I32" | "U32" => StDtype::Other(s.into(), Some(4)),
            "I16" | "U16" => StDtype::Other(s.into(), Some(2)),
            "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => StDtype::Other(s.into(), Some(1)),
            _ => StDtype::Other(s.into(), None),
        }
    }

    pub fn size(&self) -> Option<usize> {
        match self {
            StDtype::F32 => Some(4),
            StDtype::F16 | StDtype::BF16 => Some(2),
            StDtype::Other(_, s) => *s,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            StDtype::F32 => "F32",
            StDtype::F16 => "F16",
            StDtype::BF16 => "BF16",
            StDtype::Other(n, _) => n,
        }
    }
}

/// One tensor's entry: dtype, shape and its byte range inside the data section.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub begin: usize,
    pub end: usize,
}

/// A parsed safetensors file over borrowed bytes (usually a memory map).
pub struct StFile<'a> {
    pub path: PathBuf,
    data: &'a [u8],
    pub tensors: HashMap<String, TensorInfo>,
}

impl<'a> StFile<'a> {
    /// Parse and validate the header of `bytes` (the whole file).
    pub fn parse(path: &Path, bytes: &'a [u8]) -> Result<StFile<'a>> {
        let bad = |msg: String| Error::format(path, msg);
        if bytes.len() < 8 {
            return Err(bad(format!(
                "truncated safetensors file: {} bytes, shorter than the 8-byte header length",
                bytes.len()
            )));
        }
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        if n > MAX_HEADER {
            return Err(bad(format!(
                "header length {n} is implausible (limit {MAX_HEADER} bytes)"
            )));
        }
        let header_end = 8usize + n as usize;
        if header_end > bytes.len() {
            return Err(bad(format!(
                "truncated safetensors file: header of {n} bytes but only {} bytes follow",
                bytes.len() - 8
            )));
        }
        let text = std::str::from_utf8(&bytes[8..header_end])
            .map_err(|e| bad(format!("header is not UTF-8: {e}")))?;
        let v: Value = serde_json::from_str(text.trim_end_matches(' '))
            .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("header is not a JSON object".into()))?;
        let data = &bytes[header_end..];
        let mut tensors = HashMap::with_capacity(obj.len());
        for (name, entry) in obj {
            if name == "__metadata__" {
                continue;
            }
            let t = Self::entry(path, name, entry, data.len())?;
            tensors.insert(name.clone(), t);
        }
        // No two tensors may share bytes.
        let mut ranges: Vec<(&str, usize, usize)> = tensors
            .iter()
            .filter(|(_, t)| t.end > t.begin)
            .map(|(k, t)| (k.as_str(), t.begin, t.end))
            .collect();
        ranges.sort_by_key(|r| (r.1, r.2));
        for w in ranges.windows(2) {
            if w[1].1 < w[0].2 {
                return Err(bad(format!(
                    "tensors '{}' and '{}' overlap in the data section",
                    w[0].0, w[1].0
                )));
            }
        }
        Ok(StFile {
            path: path.to_path_buf(),
            data,
            tensors,
        })
    }

    fn entry(path: &Path, name: &str, e: &Value, data_len: usize) -> Result<TensorInfo> {
        let bad = |msg: String| Error::format(path, format!("tensor '{name}': {msg}"));
        let dtype = e
            .get("dtype")
            .and_then(Value::as_str)
            .map(StDtype::parse)
            .ok_or_else(|| bad("missing or non-string 'dtype'".into()))?;
        let shape: Vec<usize> = e
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("missing 'shape' array".into()))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                bad(format!(
                    "shape {} is not a list of non-negative integers",
                    e["shape"]
                ))
            })?;
        let offs = e
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad("missing 'data_offsets' [begin, end]".into()))?;
        let off = |i: usize| offs[i].as_u64().and_then(|x| usize::try_from(x).ok());
        let (begin, end) = match (off(0), off(1)) {
            (Some(b), Some(e)) => (b, e),
            _ => {
                return Err(bad(format!(
                    "data_offsets {} are not non-negative integers",
                    e["data_offsets"]
                )))
            }
        };
        if begin > end || end > data_len {
            return Err(bad(format!(
                "data_offsets [{begin}, {end}] are out of range: the data section holds {data_len} bytes \
                 (file truncated or header corrupt)"
            )));
        }
        if let Some(size) = dtype.size() {
            let want = shape.iter().try_fold(size, |acc, &d| acc.checked_mul(d));
            if want != Some(end - begin) {
                return Err(bad(format!(
                    "shape {shape:?} of {} needs {} bytes but data_offsets span {}",
                    dtype.name(),
                    want.map_or("too many".to_string(), |w| w.to_string()),
                    end - begin
                )));
            }
        }
        Ok(TensorInfo {
            dtype,
            shape,
            begin,
            end,
        })
    }

    /// The bytes of tensor `t` (validated at parse time to lie inside the data section).
    pub fn bytes(&self, t: &TensorInfo) -> &'a [u8] {
        &self.data[t.begin..t.end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn parses_and_rejects() {
        let p = Path::new("m.safetensors");
        let ok = file(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"format":"pt"}}"#,
            &[0; 8],
        );
        let f = StFile::parse(p, &ok).unwrap();
        assert_eq!(f.bytes(&f.tensors["a"]).len(), 8);
        for (bytes, needle) in [
            (ok[..5].to_vec(), "shorter than"),
            (ok[..20].to_vec(), "truncated"),
            (ok[..ok.len() - 1].to_vec(), "'a'"),
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                    &[0; 8],
                ),
                "needs 12 bytes",
            ),
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                    &[0; 8],
                ),
                "overlap",
            ),
            (file(r#"{"a":"#, &[]), "JSON"),
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,8]}}"#,
                    &[0; 8],
                ),
                "shape",
            ),
            (
                file(
                    r#"{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,8]}}"#,
                    &[0; 8],
                ),
                "too many",
            ),
        ] {
            let e = StFile::parse(p, &bytes).err().expect(needle);
            assert_eq!(e.kind(), "format");
            assert!(e.to_string().contains(needle), "{e} lacks {needle}");
        }
    }
}
