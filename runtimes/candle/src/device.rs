//! A model's copy in a GPU's memory, which the mesh's GPU tier promotes and demotes, and the CUDA
//! devices every model shares.
//!
//! The host copy of the weights is never dropped: demoting is dropping the device copy, and a later
//! promotion is one host-to-device copy of each tensor. Calls run on the device copy while there is
//! one; a call already running keeps the copy it started with (an `Arc`) until it ends, so a demotion
//! never pulls weights from under it.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Device;
use parking_lot::{Mutex, RwLock};

use crate::bert::Bert;

/// The CUDA devices, each opened once (opening one makes a stream and a cuBLAS handle) and shared by
/// every model of the runtime.
#[derive(Default)]
pub struct CudaDevices(Mutex<HashMap<usize, Device>>);

impl CudaDevices {
    /// Device `ordinal`, opened on first use. Fails without CUDA (or in a build without candle's
    /// `cuda` feature), naming why.
    pub fn get(&self, ordinal: usize) -> candle_core::Result<Device> {
        let mut devices = self.0.lock();
        if let Some(device) = devices.get(&ordinal) {
            return Ok(device.clone());
        }
        let device = Device::new_cuda(ordinal)?;
        devices.insert(ordinal, device.clone());
        Ok(device)
    }
}

/// Where a model's calls run: its device copy, if it has one.
#[derive(Default)]
pub(crate) struct DeviceSlot(RwLock<Option<(usize, Arc<Bert>)>>);

impl DeviceSlot {
    /// The device copy and its ordinal, for one call.
    pub(crate) fn current(&self) -> Option<Arc<Bert>> {
        self.0.read().as_ref().map(|(_, bert)| Arc::clone(bert))
    }

    pub(crate) fn ordinal(&self) -> Option<usize> {
        self.0.read().as_ref().map(|(ordinal, _)| *ordinal)
    }

    /// Copies `host` to `device` (numbered `ordinal`) and makes that copy the one calls use.
    pub(crate) fn promote(&self, host: &Bert, ordinal: usize, device: &Device) -> candle_core::Result<()> {
        // Copied before the lock is taken: calls go on meanwhile on whatever copy they had.
        let copy = Arc::new(host.to_device(device)?);
        *self.0.write() = Some((ordinal, copy));
        Ok(())
    }

    pub(crate) fn demote(&self) {
        let dropped = self.0.write().take();
        // Freed here, outside the lock, unless a running call still holds it.
        drop(dropped);
    }
}
