//! Kernel struct member offsets, read from the running kernel's BTF.
//!
//! Rust eBPF programs get no CO-RE relocations, so the few `task_struct` members the program
//! reads (exit code, start time, argv bounds, the thread group's live count) are located here and
//! handed to it as plain numbers.

use std::path::Path;

use btf_rs::{Btf, Type};
use thiserror::Error;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("cannot read kernel BTF from `{path}` (is CONFIG_DEBUG_INFO_BTF enabled?)")]
    Open {
        path: String,
        #[source]
        source: btf_rs::Error,
    },
    #[error("kernel BTF has no struct `{0}`")]
    NoStruct(String),
    #[error("kernel BTF: struct `{ty}` has no member `{member}`")]
    NoMember { ty: String, member: String },
    #[error("kernel BTF: `{ty}.{member}` is a bitfield")]
    Bitfield { ty: String, member: String },
}

pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    pub fn load() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let btf = Btf::from_file(path).map_err(|source| BtfError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self { btf })
    }

    /// Byte offset of `member` within struct `ty`, looking through anonymous structs and unions
    /// (randomized-layout kernels wrap most of `task_struct` and `mm_struct` in one).
    pub fn member_offset(&self, ty: &str, member: &str) -> Result<u32, BtfError> {
        let types = self
            .btf
            .resolve_types_by_name(ty)
            .map_err(|_| BtfError::NoStruct(ty.to_owned()))?;
        let Some(Type::Struct(st)) = types.into_iter().find(|t| matches!(t, Type::Struct(_)))
        else {
            return Err(BtfError::NoStruct(ty.to_owned()));
        };
        let bits = self
            .find_member(&st, member, 0)
            .ok_or_else(|| BtfError::NoMember {
                ty: ty.to_owned(),
                member: member.to_owned(),
            })?;
        if bits % 8 != 0 {
            return Err(BtfError::Bitfield {
                ty: ty.to_owned(),
                member: member.to_owned(),
            });
        }
        Ok(bits / 8)
    }

    /// The first of `members` that `ty` has (members are renamed across kernel versions).
    pub fn first_member_offset(&self, ty: &str, members: &[&str]) -> Result<u32, BtfError> {
        let mut last = None;
        for m in members {
            match self.member_offset(ty, m) {
                Ok(off) => return Ok(off),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| BtfError::NoStruct(ty.to_owned())))
    }

    fn find_member(&self, st: &btf_rs::Struct, name: &str, base_bits: u32) -> Option<u32> {
        for m in &st.members {
            let m_name = self.btf.resolve_name(m).unwrap_or_default();
            if m_name == name {
                return Some(base_bits + m.bit_offset());
            }
            if m_name.is_empty() {
                if let Some(inner) = self.composite(m) {
                    if let Some(off) = self.find_member(&inner, name, base_bits + m.bit_offset()) {
                        return Some(off);
                    }
                }
            }
        }
        None
    }

    /// The struct or union a member's type resolves to, through typedefs and qualifiers.
    fn composite(&self, m: &btf_rs::Member) -> Option<btf_rs::Struct> {
        let mut ty = self.btf.resolve_chained_type(m).ok()?;
        for _ in 0..16 {
            match ty {
                Type::Struct(s) | Type::Union(s) => return Some(s),
                Type::Typedef(ref t) => ty = self.btf.resolve_chained_type(t).ok()?,
                Type::Const(ref t) | Type::Volatile(ref t) | Type::Restrict(ref t) => {
                    ty = self.btf.resolve_chained_type(t).ok()?
                }
                Type::TypeTag(ref t) => ty = self.btf.resolve_chained_type(t).ok()?,
                _ => return None,
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs against this machine's BTF when it has one (it is read-only and needs no root).
    #[test]
    fn finds_task_struct_members_on_this_kernel() {
        if !Path::new(VMLINUX_BTF).exists() {
            eprintln!("SKIP: {VMLINUX_BTF} is absent on this machine");
            return;
        }
        let btf = KernelBtf::load().unwrap();
        let exit_code = btf.member_offset("task_struct", "exit_code").unwrap();
        let mm = btf.member_offset("task_struct", "mm").unwrap();
        assert_ne!(exit_code, mm);
        let start = btf.member_offset("mm_struct", "arg_start").unwrap();
        let end = btf.member_offset("mm_struct", "arg_end").unwrap();
        assert_eq!(end, start + 8, "arg_end follows arg_start");
        assert!(btf.member_offset("task_struct", "no_such_member").is_err());
    }
}
