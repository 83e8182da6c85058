//! VGG16 feature extractor (Simonyan and Zisserman 2015) for the perceptual and style losses.
//!
//! Only the convolutional part is built, from a local safetensors file with torchvision's names
//! `features.N.weight` and `features.N.bias` (timm uses the same ones); the classifier, if the
//! file has it, is ignored. Blocks: 2, 2, 3, 3, 3 convolutions 3x3 (padding 1) with ReLU, each
//! followed by 2x2 max pooling (derm-kernels', whose gradient is right). The weights are constants:
//! gradients flow to the input only.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use derm_core::{Error, Result};
use derm_kernels::ops::{self, ConvParams, Pool2d};

/// The convolutions of torchvision's `vgg16().features`: (index, in, out), by block.
pub const VGG16_BLOCKS: [&[(usize, usize, usize)]; 5] = [
    &[(0, 3, 64), (2, 64, 64)],
    &[(5, 64, 128), (7, 128, 128)],
    &[(10, 128, 256), (12, 256, 256), (14, 256, 256)],
    &[(17, 256, 512), (19, 512, 512), (21, 512, 512)],
    &[(24, 512, 512), (26, 512, 512), (28, 512, 512)],
];

/// The first `blocks` blocks of VGG16's convolutional part.
#[derive(Debug, Clone)]
pub struct Vgg16Features {
    blocks: Vec<Vec<(Tensor, Tensor)>>,
}

impl Vgg16Features {
    /// Loads blocks 1..=`blocks` from a safetensors file (torchvision names), as f32 on
    /// `device`. Errors name the missing or mis-shaped tensor.
    pub fn load(path: &Path, blocks: usize, device: &Device) -> Result<Self> {
        let file = derm_core::checkpoint::load_tensors(path, device)?;
        Self::from_tensors(&file, blocks, path)
    }

    /// Builds from named tensors (`features.N.weight`/`bias`); `origin` names their file.
    pub fn from_tensors(t: &HashMap<String, Tensor>, blocks: usize, origin: &Path) -> Result<Self> {
        if blocks == 0 || blocks > 5 {
            return Err(Error::invalid(format!("vgg16 has blocks 1 to 5, asked for {blocks}")));
        }
        let bad = |msg: String| Error::Checkpoint { path: origin.into(), msg };
        let mut out = Vec::with_capacity(blocks);
        for block in VGG16_BLOCKS.iter().take(blocks) {
            let mut convs = Vec::with_capacity(block.len());
            for &(i, c_in, c_out) in block.iter() {
                let get = |name: String, shape: &[usize]| -> Result<Tensor> {
                    let x = t
                        .get(&name)
                        .ok_or_else(|| bad(format!("tensor `{name}` is missing: not torchvision vgg16 weights")))?;
                    if x.dims() != shape {
                        return Err(bad(format!("tensor `{name}` has shape {:?} but vgg16 needs {shape:?}", x.dims())));
                    }
                    Ok(x.to_dtype(DType::F32)?)
                };
                let w = get(format!("features.{i}.weight"), &[c_out, c_in, 3, 3])?;
                let b = get(format!("features.{i}.bias"), &[c_out])?;
                convs.push((w, b.reshape((1, c_out, 1, 1))?));
            }
            out.push(convs);
        }
        Ok(Vgg16Features { blocks: out })
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The pooled output of each block (pool1, pool2, ...) for images (N, 3, H, W) in
    /// ImageNet normalisation; block b has (N, C_b, H / 2^b, W / 2^b).
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let p = ConvParams { padding: 1, ..Default::default() };
        let mut h = x.clone();
        let mut feats = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            for (w, b) in block {
                h = crate::pconv::conv(&h, w, p)?.broadcast_add(b)?.relu()?;
            }
            h = ops::max_pool2d(&h, Pool2d::square(2, 2, 0))?;
            feats.push(h.clone());
        }
        Ok(feats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(blocks: usize, wrong: Option<&str>) -> HashMap<String, Tensor> {
        let mut t = HashMap::new();
        for block in VGG16_BLOCKS.iter().take(blocks) {
            for &(i, c_in, c_out) in block.iter() {
                let wname = format!("features.{i}.weight");
                let wshape = if wrong == Some(wname.as_str()) { (c_out, c_in + 1, 3, 3) } else { (c_out, c_in, 3, 3) };
                t.insert(wname, Tensor::rand(-0.05f32, 0.05, wshape, &Device::Cpu).unwrap());
                t.insert(format!("features.{i}.bias"), Tensor::zeros(c_out, DType::F32, &Device::Cpu).unwrap());
            }
        }
        t
    }

    #[test]
    fn loads_torchvision_names_and_names_a_wrong_tensor() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vgg.safetensors");
        let mut t = fake(3, None);
        // A classifier tensor is ignored.
        t.insert("classifier.6.bias".into(), Tensor::zeros(10, DType::F32, &Device::Cpu).unwrap());
        derm_core::checkpoint::save_tensors(&t, &p).unwrap();
        let v = Vgg16Features::load(&p, 3, &Device::Cpu).unwrap();
        assert_eq!(v.blocks(), 3);
        let x = Tensor::rand(-1f32, 1., (2, 3, 20, 18), &Device::Cpu).unwrap();
        let f = v.forward(&x).unwrap();
        assert_eq!(f[0].dims(), &[2, 64, 10, 9]);
        assert_eq!(f[1].dims(), &[2, 128, 5, 4]);
        assert_eq!(f[2].dims(), &[2, 256, 2, 2]);
        // Four blocks are not in the file.
        let e = Vgg16Features::load(&p, 4, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("features.17.weight"), "{e}");
        let bad = fake(3, Some("features.12.weight"));
        derm_core::checkpoint::save_tensors(&bad, &p).unwrap();
        let e = Vgg16Features::load(&p, 3, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("features.12.weight") && e.contains("shape"), "{e}");
    }
}
