//! This machine's CUDA devices and their memory, for the mesh's GPU tier.
//!
//! With the `cuda` feature, [`discover`] asks the CUDA driver, which cudarc loads when first asked: a
//! build with the feature still starts where no CUDA exists, and [`Discovery::Unavailable`] says why.
//! Without the feature there is never a device, and nothing else changes.
//!
//! The one `unsafe` call asks cudarc whether the driver library can be loaded before anything touches
//! it (cudarc panics on a missing library rather than returning an error).
#![deny(unsafe_code)]

/// One CUDA device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Its CUDA ordinal; the tier is named `gpu<ordinal>`.
    pub ordinal: usize,
    /// Its model name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    pub total_bytes: u64,
    /// Free when it was asked (other processes may hold the rest).
    pub free_bytes: u64,
}

/// What [`discover`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// The devices the driver lists (possibly none).
    Devices(Vec<Device>),
    /// No device can be used, and why: built without the `cuda` feature, no driver, a driver error.
    Unavailable(String),
}

impl Discovery {
    /// The devices found; none when unavailable.
    pub fn devices(&self) -> &[Device] {
        match self {
            Discovery::Devices(devices) => devices,
            Discovery::Unavailable(_) => &[],
        }
    }
}

/// Lists the CUDA devices and their memory.
pub fn discover() -> Discovery {
    imp::discover()
}

#[cfg(not(any(feature = "cuda", feature = "cuda-linked")))]
mod imp {
    use super::Discovery;

    pub fn discover() -> Discovery {
        Discovery::Unavailable("built without the cuda feature".to_owned())
    }
}

#[cfg(any(feature = "cuda", feature = "cuda-linked"))]
mod imp {
    #[cfg(feature = "cuda-linked")]
    use candle_core::cuda_backend::cudarc;
    use cudarc::driver::CudaContext;

    use super::{Device, Discovery};

    pub fn discover() -> Discovery {
        if !driver_present() {
            return Discovery::Unavailable("no CUDA driver (libcuda.so) on this machine".to_owned());
        }
        let count = match CudaContext::device_count() {
            Ok(count) => count.max(0) as usize,
            Err(e) => return Discovery::Unavailable(format!("the CUDA driver lists no devices: {e}")),
        };
        let mut devices = Vec::with_capacity(count);
        for ordinal in 0..count {
            let described = CudaContext::new(ordinal).and_then(|context| {
                let name = context.name()?;
                let (free, total) = context.mem_get_info()?;
                Ok(Device { ordinal, name, total_bytes: total as u64, free_bytes: free as u64 })
            });
            match described {
                Ok(device) => devices.push(device),
                Err(e) => {
                    return Discovery::Unavailable(format!("CUDA device {ordinal} cannot be used: {e}"));
                }
            }
        }
        Discovery::Devices(devices)
    }

    #[cfg(not(feature = "cuda-linked"))]
    #[allow(unsafe_code)]
    fn driver_present() -> bool {
        // SAFETY: this only tries to load the driver library by its usual names (dlopen), which runs
        // the library's initialisers: the same the first driver call would do, and what cudarc's
        // loader is documented to be checked with before a context is made.
        unsafe { cudarc::driver::sys::is_culib_present() }
    }

    /// Linked to the CUDA libraries, the binary does not start without them.
    #[cfg(feature = "cuda-linked")]
    fn driver_present() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without CUDA (CI), with or without the feature, discovery says why and never
    /// panics; on a GPU machine it lists devices with memory.
    #[test]
    fn discovery_never_panics_and_lists_devices_with_memory_or_says_why_not() {
        match discover() {
            Discovery::Devices(devices) => {
                for d in &devices {
                    assert!(d.total_bytes > 0 && d.free_bytes <= d.total_bytes, "{d:?}");
                }
            }
            Discovery::Unavailable(why) => {
                assert!(!why.is_empty());
                assert_eq!(Discovery::Unavailable(why).devices(), &[]);
            }
        }
    }
}
