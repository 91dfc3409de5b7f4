//! Device memory regions (feature `cuda`): KV blocks in GPU memory, copied host-to-device,
//! device-to-host and device-to-device through the CUDA driver (`cudarc`, loaded at run time).
//!
//! Without a CUDA driver or device every constructor returns
//! [`TransferError::CudaUnavailable`]; nothing here panics for want of a GPU (the driver
//! library's presence is checked before any call that would load it).
//!
//! Copies are bounds- and layout-checked like host copies and synchronous with respect to the
//! caller (the stream is synchronized before a copy returns), so a device region is a drop-in
//! destination for a transfer that staged its bytes in a host [`Region`].

// One unsafe call: probing for the driver library before anything would load it.
#![allow(unsafe_code)]

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DriverError};

use crate::{Descriptor, Layout, Region, RegionId, TransferError};

fn unavailable(e: DriverError) -> TransferError {
    TransferError::CudaUnavailable(e.to_string())
}

/// Whether a CUDA driver library can be loaded here.
pub fn driver_present() -> bool {
    // SAFETY: it only tries to load the driver library and reports whether that worked.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// A region of device memory holding blocks of one layout.
pub struct DeviceRegion {
    id: RegionId,
    layout: Layout,
    stream: Arc<CudaStream>,
    mem: CudaSlice<u8>,
}

impl DeviceRegion {
    /// Allocates `blocks` zeroed blocks on device `ordinal`.
    pub fn new(
        id: RegionId,
        ordinal: usize,
        layout: Layout,
        blocks: usize,
    ) -> Result<Self, TransferError> {
        if !driver_present() {
            return Err(TransferError::CudaUnavailable(
                "no CUDA driver library (libcuda) on this machine; use host regions".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(unavailable)?;
        let stream = ctx.default_stream();
        let mem = stream
            .alloc_zeros::<u8>(blocks * layout.block_bytes())
            .map_err(unavailable)?;
        Ok(Self {
            id,
            layout,
            stream,
            mem,
        })
    }

    pub fn id(&self) -> RegionId {
        self.id
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn len(&self) -> usize {
        self.mem.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mem.len() == 0
    }

    fn range(&self, d: &Descriptor) -> Result<std::ops::Range<usize>, TransferError> {
        if d.region != self.id {
            return Err(TransferError::UnknownRegion(d.region));
        }
        let end = d.offset.checked_add(d.len);
        if end.is_none_or(|e| e > self.mem.len() as u64) {
            return Err(TransferError::OutOfBounds {
                offset: d.offset,
                len: d.len,
                region_len: self.mem.len() as u64,
            });
        }
        Ok(d.offset as usize..(d.offset + d.len) as usize)
    }

    fn same_layout(&self, other: Layout) -> Result<(), TransferError> {
        if self.layout != other {
            return Err(TransferError::LayoutMismatch {
                local: self.layout,
                remote: other,
            });
        }
        Ok(())
    }

    /// Host bytes into the device range `d`.
    pub fn write(&mut self, d: &Descriptor, src: &[u8]) -> Result<(), TransferError> {
        let r = self.range(d)?;
        if src.len() != r.len() {
            return Err(TransferError::LengthMismatch {
                src: src.len() as u64,
                dst: r.len() as u64,
            });
        }
        let mut view = self.mem.slice_mut(r);
        self.stream
            .memcpy_htod(src, &mut view)
            .map_err(unavailable)?;
        self.stream.synchronize().map_err(unavailable)
    }

    /// The device range `d` into host memory.
    pub fn read(&self, d: &Descriptor) -> Result<Vec<u8>, TransferError> {
        let r = self.range(d)?;
        let mut out = vec![0u8; r.len()];
        let view = self.mem.slice(r);
        self.stream
            .memcpy_dtoh(&view, &mut out)
            .map_err(unavailable)?;
        self.stream.synchronize().map_err(unavailable)?;
        Ok(out)
    }

    /// A host region's range `src` into the device range `dst` (the onboarding copy).
    pub fn copy_from_host(
        &mut self,
        dst: &Descriptor,
        host: &Region,
        src: &Descriptor,
    ) -> Result<(), TransferError> {
        self.same_layout(host.layout())?;
        let bytes = host.read(src)?;
        self.write(dst, &bytes)
    }

    /// The device range `src` into a host region's range `dst` (the offloading copy).
    pub fn copy_to_host(
        &self,
        src: &Descriptor,
        host: &Region,
        dst: &Descriptor,
    ) -> Result<(), TransferError> {
        self.same_layout(host.layout())?;
        host.owns(dst)?;
        let bytes = self.read(src)?;
        host.write(dst.offset as usize, &bytes)
    }

    /// Another device region's range `src` into the range `dst` (device to device).
    pub fn copy_from_device(
        &mut self,
        dst: &Descriptor,
        other: &DeviceRegion,
        src: &Descriptor,
    ) -> Result<(), TransferError> {
        self.same_layout(other.layout)?;
        let (d, s) = (self.range(dst)?, other.range(src)?);
        if d.len() != s.len() {
            return Err(TransferError::LengthMismatch {
                src: s.len() as u64,
                dst: d.len() as u64,
            });
        }
        other.stream.synchronize().map_err(unavailable)?;
        let from = other.mem.slice(s);
        let mut to = self.mem.slice_mut(d);
        self.stream
            .memcpy_dtod(&from, &mut to)
            .map_err(unavailable)?;
        self.stream.synchronize().map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Dtype;

    const LAYOUT: Layout = Layout {
        layers: 1,
        kv_heads: 1,
        head_dim: 4,
        block_size: 2,
        dtype: Dtype::F32,
    };

    /// On a machine without a GPU (CI), asking for device memory is a typed error; with one,
    /// bytes go host to device, device to device and back unchanged.
    #[test]
    fn device_regions_copy_or_say_cuda_is_unavailable() {
        let a = match DeviceRegion::new(RegionId(1), 0, LAYOUT, 2) {
            Ok(a) => a,
            Err(e) => {
                assert!(matches!(e, TransferError::CudaUnavailable(_)), "{e:?}");
                return;
            }
        };
        let mut a = a;
        let mut b = DeviceRegion::new(RegionId(2), 0, LAYOUT, 2).unwrap();
        let bb = LAYOUT.block_bytes() as u64;
        let block = |r: u32, i: u64| Descriptor {
            region: RegionId(r),
            offset: i * bb,
            len: bb,
        };
        let data: Vec<u8> = (0..bb as u8).collect();
        a.write(&block(1, 1), &data).unwrap();
        b.copy_from_device(&block(2, 0), &a, &block(1, 1)).unwrap();
        assert_eq!(b.read(&block(2, 0)).unwrap(), data);
        assert!(matches!(
            b.read(&block(2, 2)),
            Err(TransferError::OutOfBounds { .. })
        ));
    }
}
