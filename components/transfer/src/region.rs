//! Registered host memory regions: the memory a transfer writes into or reads from.
//!
//! Every host region is a `memfd` mapped shared, so a peer on the same host can map the same
//! pages once (through `/proc/PID/fd/FD`) and copy straight into them: no socket, no
//! intermediate buffer, and the owner reads the bytes where they landed. The memory goes
//! away with the last mapping (a killed process leaves nothing behind in `/dev/shm`).
//!
//! Invariants:
//! - Memory is only touched through raw-pointer copies ([`Mapping::copy_in`] and
//!   [`Mapping::copy_out`]) after a bounds check; no `&mut [u8]` to shared memory ever exists
//!   outside those copies, because another process may write other ranges at the same time.
//! - Who may write which range is the protocol's job (a reservation owns its blocks until
//!   the transfer completes or its deadline passes); a region only keeps accesses in bounds.
// This module maps shared memory and copies through raw pointers; each unsafe block says why
// it is sound.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use memmap2::MmapRaw;
use serde::{Deserialize, Serialize};

use crate::{Descriptor, Layout, TransferError};

/// A region's id, unique within its agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RegionId(pub u32);

impl std::fmt::Display for RegionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "region {}", self.0)
    }
}

/// A shared mapping of a region's memory: the owner's, or a peer's view of it.
pub(crate) struct Mapping {
    map: MmapRaw,
    len: usize,
}

impl Mapping {
    /// Creates `len` bytes of shared, zeroed memory (a memfd) and maps it.
    pub(crate) fn create(name: &str, len: usize) -> Result<(Self, File), TransferError> {
        let cname = std::ffi::CString::new(name.replace('\0', "_"))
            .map_err(|e| TransferError::Io(e.to_string()))?;
        // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(TransferError::Io(format!(
                "memfd_create: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len.max(1) as u64)
            .map_err(|e| TransferError::Io(format!("sizing a {len}-byte region: {e}")))?;
        let map = MmapRaw::map_raw(&file)
            .map_err(|e| TransferError::Io(format!("mapping a {len}-byte region: {e}")))?;
        Ok((Self { map, len }, file))
    }

    /// Maps a region another process on this host registered.
    pub(crate) fn open(pid: u32, fd: i32, len: usize) -> Result<Self, TransferError> {
        let path = format!("/proc/{pid}/fd/{fd}");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| {
                TransferError::PeerGone(format!("cannot open the peer's region at {path}: {e}"))
            })?;
        let actual = file
            .metadata()
            .map_err(|e| TransferError::Io(e.to_string()))?
            .len();
        if actual < len as u64 {
            return Err(TransferError::RegionSize {
                expected: len as u64,
                actual,
            });
        }
        let map = MmapRaw::map_raw(&file)
            .map_err(|e| TransferError::Io(format!("mapping the peer's region: {e}")))?;
        Ok(Self { map, len })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), TransferError> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(TransferError::OutOfBounds {
                offset: offset as u64,
                len: len as u64,
                region_len: self.len as u64,
            });
        }
        Ok(())
    }

    /// Copies `src` into the region at `offset`.
    pub(crate) fn copy_in(&self, offset: usize, src: &[u8]) -> Result<(), TransferError> {
        self.check(offset, src.len())?;
        // SAFETY: the range is inside the mapping (checked above); `src` is ordinary memory
        // of this process, so it cannot overlap the destination range of a shared mapping
        // being written (a caller copying within one region goes through `copy_within`).
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                self.map.as_mut_ptr().add(offset),
                src.len(),
            )
        };
        Ok(())
    }

    /// Copies the region's bytes at `offset` into `dst`.
    pub(crate) fn copy_out(&self, offset: usize, dst: &mut [u8]) -> Result<(), TransferError> {
        self.check(offset, dst.len())?;
        // SAFETY: the range is inside the mapping (checked above) and `dst` is exclusively
        // borrowed ordinary memory.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(offset),
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
        Ok(())
    }

    /// Copies `len` bytes from `src` (at `src_off`) into this mapping at `dst_off`: the
    /// shared-memory and in-process backends' whole data path.
    pub(crate) fn copy_from(
        &self,
        dst_off: usize,
        src: &Mapping,
        src_off: usize,
        len: usize,
    ) -> Result<(), TransferError> {
        self.check(dst_off, len)?;
        src.check(src_off, len)?;
        // SAFETY: both ranges are inside their mappings (checked above). `copy` (memmove)
        // rather than `copy_nonoverlapping`: two mappings may be views of the same pages.
        unsafe {
            std::ptr::copy(
                src.map.as_ptr().add(src_off),
                self.map.as_mut_ptr().add(dst_off),
                len,
            )
        };
        Ok(())
    }

    /// A mutable view of `len` bytes at `offset`, for a socket to read straight into.
    ///
    /// # Safety
    /// The caller must be the only writer of this range while the view lives, and nobody may
    /// read the range meanwhile (the transfer protocol's reservation guarantees both).
    // Shared memory is mutable through `&self` by design (peers write it too); the unsafe
    // contract above is what makes this exclusive.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn view_mut(
        &self,
        offset: usize,
        len: usize,
    ) -> Result<&mut [u8], TransferError> {
        self.check(offset, len)?;
        // SAFETY: in bounds (checked above); exclusivity is the caller's contract.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(offset), len) })
    }

    /// A view of `len` bytes at `offset`, for a socket to send from.
    ///
    /// # Safety
    /// Nobody may write the range while the view lives.
    pub(crate) unsafe fn view(&self, offset: usize, len: usize) -> Result<&[u8], TransferError> {
        self.check(offset, len)?;
        // SAFETY: in bounds (checked above); no concurrent writer is the caller's contract.
        Ok(unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(offset), len) })
    }
}

/// A registered host region: shared memory an agent lends to transfers.
pub struct Region {
    id: RegionId,
    layout: Layout,
    pub(crate) mapping: Mapping,
    file: File,
}

impl Region {
    pub(crate) fn create(id: RegionId, layout: Layout, len: usize) -> Result<Self, TransferError> {
        let (mapping, file) = Mapping::create(&format!("dynamo-kv-{}", id.0), len)?;
        Ok(Self {
            id,
            layout,
            mapping,
            file,
        })
    }

    pub fn id(&self) -> RegionId {
        self.id
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn len(&self) -> usize {
        self.mapping.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mapping.len() == 0
    }

    /// Blocks of [`Region::layout`] that fit.
    pub fn blocks(&self) -> usize {
        self.len() / self.layout.block_bytes().max(1)
    }

    /// The descriptor of block `index` of this region.
    pub fn block(&self, index: usize) -> Descriptor {
        let b = self.layout.block_bytes() as u64;
        Descriptor {
            region: self.id,
            offset: index as u64 * b,
            len: b,
        }
    }

    pub(crate) fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Copies bytes in (the owner filling a region it will send from).
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<(), TransferError> {
        self.mapping.copy_in(offset, src)
    }

    /// Copies a descriptor's bytes out, straight from the shared pages (the owner reading
    /// what a peer wrote).
    pub fn read(&self, d: &Descriptor) -> Result<Vec<u8>, TransferError> {
        self.owns(d)?;
        let mut out = vec![0u8; d.len as usize];
        self.mapping.copy_out(d.offset as usize, &mut out)?;
        Ok(out)
    }

    pub(crate) fn owns(&self, d: &Descriptor) -> Result<(), TransferError> {
        if d.region != self.id {
            return Err(TransferError::UnknownRegion(d.region));
        }
        Ok(())
    }
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("id", &self.id)
            .field("layout", &self.layout)
            .field("len", &self.len())
            .finish()
    }
}
