//! A strict reader for the safetensors format: an 8-byte little-endian header length, a JSON
//! header mapping tensor names to dtype, shape and byte range, then the raw data.
//!
//! The header is validated completely before any tensor is touched (lengths, overflow, ranges,
//! element counts), so a truncated or hostile file is a typed error, never a panic or an
//! out-of-bounds read. The file is memory-mapped: reading 4 of 256 experts touches 4 ranges.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// Largest header we accept; the format's own reference implementation uses the same bound.
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// Element types a safetensors file can declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    F8E4M3,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "F8_E4M3" => Dtype::F8E4M3,
            "F64" => Dtype::F64,
            "I64" => Dtype::I64,
            "I32" => Dtype::I32,
            "I16" => Dtype::I16,
            "I8" => Dtype::I8,
            "U8" => Dtype::U8,
            "BOOL" => Dtype::Bool,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::F8E4M3 | Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }
}

/// Where one tensor lives inside the data section.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range relative to the start of the data section.
    pub begin: usize,
    pub end: usize,
}

/// A parsed header: tensors by name and the offset at which the data section begins.
#[derive(Debug)]
pub struct Header {
    pub tensors: HashMap<String, TensorInfo>,
    pub data_offset: usize,
}

/// Parses and validates the header of a safetensors buffer (the whole file's bytes).
/// Errors are plain messages; the caller adds the path.
pub fn parse_header(bytes: &[u8]) -> std::result::Result<Header, String> {
    if bytes.len() < 8 {
        return Err(format!(
            "file is {} bytes, shorter than the 8-byte header length",
            bytes.len()
        ));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&bytes[..8]);
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES {
        return Err(format!(
            "header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit"
        ));
    }
    let header_end = 8usize
        .checked_add(header_len as usize)
        .ok_or("header length overflows")?;
    if header_end > bytes.len() {
        return Err(format!(
            "header of {header_len} bytes runs past the end of the {}-byte file (truncated?)",
            bytes.len()
        ));
    }
    let json: Value = serde_json::from_slice(&bytes[8..header_end])
        .map_err(|e| format!("header is not valid JSON: {e}"))?;
    let entries = json.as_object().ok_or("header is not a JSON object")?;
    let data_len = bytes.len() - header_end;
    let mut tensors = HashMap::with_capacity(entries.len());
    for (name, entry) in entries {
        if name == "__metadata__" {
            continue;
        }
        let info = parse_entry(name, entry)?;
        if info.end > data_len {
            return Err(format!(
                "tensor {name} ends at byte {} but the data section has {data_len} bytes (truncated?)",
                info.end
            ));
        }
        tensors.insert(name.clone(), info);
    }
    Ok(Header {
        tensors,
        data_offset: header_end,
    })
}

fn parse_entry(name: &str, entry: &Value) -> std::result::Result<TensorInfo, String> {
    let dtype_name = entry
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("tensor {name} has no dtype"))?;
    let dtype = Dtype::parse(dtype_name)
        .ok_or_else(|| format!("tensor {name} has unknown dtype {dtype_name:?}"))?;
    let shape = entry
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("tensor {name} has no shape"))?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| format!("tensor {name} has a malformed shape"))?;
    let offsets = entry
        .get("data_offsets")
        .and_then(Value::as_array)
        .filter(|o| o.len() == 2)
        .ok_or_else(|| format!("tensor {name} has no [begin, end] data_offsets"))?;
    let offset = |i: usize| offsets[i].as_u64().and_then(|v| usize::try_from(v).ok());
    let (begin, end) = match (offset(0), offset(1)) {
        (Some(b), Some(e)) if b <= e => (b, e),
        _ => return Err(format!("tensor {name} has invalid data_offsets")),
    };
    let numel = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.size()))
        .ok_or_else(|| format!("tensor {name} shape {shape:?} overflows"))?;
    if numel != end - begin {
        return Err(format!(
            "tensor {name} declares shape {shape:?} of {dtype_name} ({numel} bytes) but spans {} bytes",
            end - begin
        ));
    }
    Ok(TensorInfo {
        dtype,
        shape,
        begin,
        end,
    })
}

/// One memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    header: Header,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the checkpoint is treated as read-only; a concurrent writer truncating it is
        // outside what any model server can defend against (candle and vLLM map files the same way).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let header = parse_header(&mmap).map_err(|message| ModelError::Safetensors {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            header,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensors.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.header.tensors.keys().map(String::as_str)
    }

    /// The raw little-endian bytes of a tensor (bounds were checked when the header was parsed).
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = self.header.data_offset + info.begin;
        &self.mmap[start..self.header.data_offset + info.end]
    }

    /// Drops the mapped pages that hold only this tensor from the process's memory, once a
    /// copy in the precision it is served in exists: without it, a loaded model counts its
    /// checkpoint twice (the mapped file and the packed weights). A later read faults the
    /// same bytes back in from the file.
    pub fn release(&self, info: &TensorInfo) {
        const PAGE: usize = 4096;
        let start = (self.header.data_offset + info.begin).next_multiple_of(PAGE);
        let end = (self.header.data_offset + info.end) / PAGE * PAGE;
        if end > start {
            // SAFETY: a read-only shared file mapping: MADV_DONTNEED drops the pages, and the
            // next access reads the file's unchanged bytes again, so every live slice of the
            // mapping keeps its contents.
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }
}

/// Serialises tensors in the safetensors layout (used by `moe gen-checkpoint` and tests).
#[derive(Default)]
pub struct SafetensorsWriter {
    entries: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
}

impl SafetensorsWriter {
    pub fn add(
        &mut self,
        name: impl Into<String>,
        dtype: Dtype,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    ) {
        self.entries.push((name.into(), dtype, shape, bytes));
    }

    pub fn add_f32(&mut self, name: impl Into<String>, shape: Vec<usize>, values: &[f32]) {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add(name, Dtype::F32, shape, bytes);
    }

    pub fn add_bf16(&mut self, name: impl Into<String>, shape: Vec<usize>, values: &[f32]) {
        let bytes = values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        self.add(name, Dtype::BF16, shape, bytes);
    }

    pub fn total_bytes(&self) -> usize {
        self.entries.iter().map(|e| e.3.len()).sum()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.0.as_str())
    }

    /// Writes the file; tensors are laid out in name order, as the reference writer does.
    pub fn write(mut self, path: &Path) -> Result<()> {
        use std::io::Write;
        self.entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut offset = 0usize;
        for (name, dtype, shape, bytes) in &self.entries {
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
            );
            offset += bytes.len();
        }
        let mut header_bytes = serde_json::to_vec(&Value::Object(header))
            .map_err(|e| ModelError::InvalidRequest(e.to_string()))?;
        while header_bytes.len() % 8 != 0 {
            header_bytes.push(b' ');
        }
        let file = File::create(path).map_err(|e| ModelError::io(path, e))?;
        let mut out = std::io::BufWriter::new(file);
        let io = |e| ModelError::io(path, e);
        out.write_all(&(header_bytes.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(&header_bytes).map_err(io)?;
        for (_, _, _, bytes) in &self.entries {
            out.write_all(bytes).map_err(io)?;
        }
        out.flush().map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with_header(json: &str, data: &[u8]) -> Vec<u8> {
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    #[test]
    fn rejects_short_and_truncated_files() {
        assert!(parse_header(&[1, 2, 3]).unwrap_err().contains("shorter"));
        let mut bytes = file_with_header(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            &[0; 8],
        );
        assert!(parse_header(&bytes).is_ok());
        bytes.truncate(bytes.len() - 1);
        assert!(parse_header(&bytes).unwrap_err().contains("truncated"));
        let huge = u64::MAX.to_le_bytes();
        assert!(parse_header(&huge).is_err());
    }

    #[test]
    fn rejects_inconsistent_entries() {
        let cases = [
            r#"{"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}}"#,
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#,
            r#"{"a":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,8]}}"#,
            r#"{"a":{"dtype":"F32","shape":[2]}}"#,
            r#"[1,2]"#,
            r#"{"a":"#,
        ];
        for case in cases {
            assert!(
                parse_header(&file_with_header(case, &[0; 8])).is_err(),
                "{case}"
            );
        }
    }
}
