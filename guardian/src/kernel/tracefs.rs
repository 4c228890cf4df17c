//! Tracepoint record layouts, read from tracefs `format` files.
//!
//! The eBPF program reads tracepoint fields at offsets it is given, so the same object works on
//! kernels whose records differ (older kernels have other offsets, and lack `group_dead`).

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use thiserror::Error;

const TRACEFS_MOUNTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error("tracefs is not mounted and mounting it at `{path}` failed")]
    Mount {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read tracepoint format `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tracepoint `{tracepoint}` has no field `{field}`")]
    MissingField { tracepoint: String, field: String },
    #[error("tracepoint `{tracepoint}` field `{field}` has size {size}, expected {expected}")]
    FieldSize {
        tracepoint: String,
        field: String,
        size: u32,
        expected: u32,
    },
}

/// One field of a tracepoint record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub ty: String,
    pub offset: u32,
    pub size: u32,
}

/// The fields of one tracepoint record, by name.
#[derive(Clone, Debug, Default)]
pub struct Format {
    pub name: String,
    pub fields: HashMap<String, Field>,
}

impl Format {
    /// Parses the text of a `format` file.
    pub fn parse(name: &str, text: &str) -> Self {
        let mut fields = HashMap::new();
        for line in text.lines() {
            let Some(rest) = line.trim().strip_prefix("field:") else {
                continue;
            };
            let mut parts = rest.split(';').map(str::trim);
            let Some(decl) = parts.next() else { continue };
            let mut offset = None;
            let mut size = None;
            for part in parts {
                if let Some(v) = part.strip_prefix("offset:") {
                    offset = v.parse().ok();
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = v.parse().ok();
                }
            }
            let (Some(offset), Some(size)) = (offset, size) else {
                continue;
            };
            // `char comm[16]` names `comm`; `__data_loc char[] filename` names `filename`.
            let Some(last) = decl.split_whitespace().last() else {
                continue;
            };
            let field_name = last.split('[').next().unwrap_or(last).to_owned();
            let ty = decl[..decl.len() - last.len()].trim().to_owned();
            fields.insert(field_name, Field { ty, offset, size });
        }
        Self {
            name: name.to_owned(),
            fields,
        }
    }

    /// The offset of a field that must exist with the given size.
    pub fn offset(&self, field: &str, size: u32) -> Result<u32, TracefsError> {
        let f = self
            .optional(field)
            .ok_or_else(|| TracefsError::MissingField {
                tracepoint: self.name.clone(),
                field: field.to_owned(),
            })?;
        if f.size != size {
            return Err(TracefsError::FieldSize {
                tracepoint: self.name.clone(),
                field: field.to_owned(),
                size: f.size,
                expected: size,
            });
        }
        Ok(f.offset)
    }

    pub fn optional(&self, field: &str) -> Option<&Field> {
        self.fields.get(field)
    }
}

/// The tracefs mount point, mounting tracefs if no mount exists.
pub fn tracefs_root() -> Result<PathBuf, TracefsError> {
    for root in TRACEFS_MOUNTS {
        if Path::new(root).join("events").is_dir() {
            return Ok(PathBuf::from(root));
        }
    }
    let target = TRACEFS_MOUNTS[0];
    rustix::mount::mount(
        "nodev",
        target,
        "tracefs",
        rustix::mount::MountFlags::empty(),
        None,
    )
    .map_err(|e| TracefsError::Mount {
        path: target.to_owned(),
        source: e.into(),
    })?;
    Ok(PathBuf::from(target))
}

/// Reads `events/<category>/<name>/format`.
pub fn read_format(root: &Path, category: &str, name: &str) -> Result<Format, TracefsError> {
    let path = root.join("events").join(category).join(name).join("format");
    let text = fs::read_to_string(&path).map_err(|source| TracefsError::Read {
        path: path.clone(),
        source,
    })?;
    Ok(Format::parse(&format!("{category}:{name}"), &text))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXEC: &str = "name: sched_process_exec\nID: 365\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
\tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;\n\
\tfield:pid_t pid;\toffset:12;\tsize:4;\tsigned:1;\n\
\tfield:pid_t old_pid;\toffset:16;\tsize:4;\tsigned:1;\n\n\
print fmt: \"filename=%s pid=%d old_pid=%d\", __get_str(filename), REC->pid, REC->old_pid\n";

    #[test]
    fn parses_data_loc_and_plain_fields() {
        let f = Format::parse("sched:sched_process_exec", EXEC);
        assert_eq!(f.offset("filename", 4).unwrap(), 8);
        assert_eq!(f.fields["filename"].ty, "__data_loc char[]");
        assert_eq!(f.offset("old_pid", 4).unwrap(), 16);
        assert!(f.optional("group_dead").is_none());
    }

    #[test]
    fn array_field_name_drops_brackets() {
        let text = "\tfield:char comm[16];\toffset:12;\tsize:16;\tsigned:0;\n";
        let f = Format::parse("task:task_newtask", text);
        assert_eq!(f.offset("comm", 16).unwrap(), 12);
    }

    #[test]
    fn wrong_size_and_missing_field_are_errors() {
        let f = Format::parse("sched:sched_process_exec", EXEC);
        let e = f.offset("pid", 8).unwrap_err().to_string();
        assert!(e.contains("`pid` has size 4, expected 8"), "{e}");
        let e = f.offset("group_dead", 1).unwrap_err().to_string();
        assert!(e.contains("no field `group_dead`"), "{e}");
    }
}
