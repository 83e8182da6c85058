//! A small torchvision-style state dict generated here (no Python): a ResNet-18 layout at base
//! width 8, every tensor under torchvision's name, an int64 `num_batches_tracked` scalar for every
//! batch norm and a 1000-class `fc`, loaded through the path `derm classify train --pretrained`
//! takes ([`Classifier::with_pretrained`]).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use derm_classify::{load_torchvision, Classifier, ClassifyConfig, ResNet, ResNetConfig};
use derm_core::checkpoint;

fn small(num_classes: usize) -> ResNetConfig {
    ResNetConfig { base_width: 8, ..ResNetConfig::resnet18(num_classes) }
}

fn build(cfg: &ResNetConfig, seed: u64) -> (VarMap, ResNet) {
    let vm = VarMap::new();
    let vb = derm_core::nn::seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu);
    let net = ResNet::new(cfg, vb).unwrap();
    (vm, net)
}

/// The "ImageNet" model: 1000 classes, batch-norm parameters and running statistics randomised
/// (so that eval mode is not the identity and every one of them matters), and its state dict as
/// torchvision writes it.
fn source() -> (ResNet, HashMap<String, Tensor>) {
    let (vm, net) = build(&small(1000), 11);
    let mut rng = derm_core::Rng::new(12);
    let mut t = HashMap::new();
    for (name, var) in checkpoint::sorted_vars(&vm) {
        let n = var.elem_count();
        let v: Vec<f32> = if name.ends_with("running_var") {
            rng.normal_vec(n, 0.0, 0.5).into_iter().map(|x| 0.5 + x.abs()).collect()
        } else if name.ends_with("running_mean") || name.contains("bn") || name.contains("downsample.1") {
            rng.normal_vec(n, 0.2, 0.5)
        } else {
            Vec::new()
        };
        if !v.is_empty() {
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        if let Some(bn) = name.strip_suffix(".running_var") {
            t.insert(format!("{bn}.num_batches_tracked"), Tensor::new(1i64, &Device::Cpu).unwrap());
        }
        t.insert(name, var.as_tensor().clone());
    }
    (net, t)
}

fn save(t: &HashMap<String, Tensor>, path: &Path) {
    checkpoint::save_tensors(t, path).unwrap();
}

fn input() -> Tensor {
    let mut r = derm_core::Rng::new(3);
    Tensor::from_vec(r.normal_vec(2 * 3 * 64 * 64, 0.0, 1.0), (2, 3, 64, 64), &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn config(pretrained: &Path) -> ClassifyConfig {
    ClassifyConfig { model: small(3), pretrained: Some(pretrained.to_path_buf()), ..Default::default() }
}

#[test]
fn torchvision_named_file_loads_every_tensor_and_replaces_the_head() {
    let d = tempfile::tempdir().unwrap();
    let (src, t) = source();
    // torchvision's resnet18 state dict has 122 keys, 20 of them num_batches_tracked.
    assert_eq!(t.len(), 122);
    assert_eq!(t.keys().filter(|k| k.ends_with(".num_batches_tracked")).count(), 20);
    for k in ["conv1.weight", "bn1.num_batches_tracked", "layer2.0.downsample.1.running_var", "fc.weight"] {
        assert!(t.contains_key(k), "{k}");
    }
    assert_eq!(t["fc.weight"].dims(), &[1000, 64]);
    let path = d.path().join("resnet18-w8.safetensors");
    save(&t, &path);

    // The --pretrained path: 3 classes, fc replaced, everything else from the file.
    let clf = Classifier::with_pretrained(config(&path), &Device::Cpu).unwrap();
    let fresh = Classifier::new(ClassifyConfig { pretrained: None, ..config(&path) }, &Device::Cpu).unwrap();
    let fresh_vars: HashMap<String, Tensor> =
        checkpoint::sorted_vars(&fresh.varmap).into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
    let mut loaded = 0;
    for (name, var) in checkpoint::sorted_vars(&clf.varmap) {
        if name.starts_with("fc.") {
            // The model's own freshly initialised head of 3 classes.
            assert_eq!(var.dims()[0], 3, "{name}");
            assert_eq!(max_diff(var.as_tensor(), &fresh_vars[&name]), 0.0, "{name}");
        } else if name.starts_with("aux_mask.") {
            // derm's training-only lesion-mask head (on by default) keeps its initialisation.
            assert_eq!(max_diff(var.as_tensor(), &fresh_vars[&name]), 0.0, "{name}");
        } else {
            assert_eq!(max_diff(var.as_tensor(), &t[&name]), 0.0, "{name} did not land");
            loaded += 1;
        }
    }
    // Every tensor of the file but the 2 of fc and the 20 counters.
    assert_eq!(loaded, 100);
    let x = input();
    let a = src.forward_features(&x, false).unwrap();
    let b = clf.net.forward_features(&x, false).unwrap();
    assert_eq!(max_diff(&a.stem, &b.stem), 0.0);
    for (la, lb) in a.layers.iter().zip(&b.layers) {
        assert_eq!(max_diff(la, lb), 0.0);
    }
    assert_eq!(max_diff(&a.pooled, &b.pooled), 0.0);
    assert_eq!(b.logits.dims(), &[2, 3]);

    // Without head replacement a 1000-class model reproduces the source's logits exactly.
    let (vm, net) = build(&small(1000), 99);
    assert!(max_diff(&net.forward_t(&x, false).unwrap(), &a.logits) > 1e-4);
    load_torchvision(&vm, &path, false).unwrap();
    assert_eq!(max_diff(&net.forward_t(&x, false).unwrap(), &a.logits), 0.0);
}

#[test]
fn wrong_shape_missing_or_foreign_tensor_is_an_error_naming_it_and_the_file() {
    let d = tempfile::tempdir().unwrap();
    let (_, t) = source();
    let zeros = |shape: &[usize]| Some(Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap());
    // (tensor, what replaces it (None: removed), what the error says)
    let cases = [
        ("layer3.1.bn2.running_var", None, "missing"),
        ("layer2.0.conv1.weight", zeros(&[16, 9, 3, 3]), "shape"),
        // A deeper network's block (ResNet-34 has layer1.2): not silently dropped.
        ("layer1.2.conv1.weight", zeros(&[8, 8, 3, 3]), "not in the model"),
    ];
    for (k, (name, replacement, what)) in cases.into_iter().enumerate() {
        let mut bad = t.clone();
        match replacement {
            Some(r) => bad.insert(name.to_string(), r),
            None => bad.remove(name),
        };
        let path = d.path().join(format!("bad{k}.safetensors"));
        save(&bad, &path);
        let e = match Classifier::with_pretrained(config(&path), &Device::Cpu) {
            Ok(_) => panic!("{name}: loaded"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(name) && e.contains(what) && e.contains(&format!("bad{k}.safetensors")), "{e}");
    }
    // A file that is not there is named too.
    let e = match Classifier::with_pretrained(config(&d.path().join("nope.safetensors")), &Device::Cpu) {
        Ok(_) => panic!("loaded a missing file"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("nope.safetensors"), "{e}");
}
