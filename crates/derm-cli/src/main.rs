//! `derm`: the command-line front of derm. One subcommand per pipeline stage, so each stage can be
//! run (and swapped) alone; stages hand work to each other through folders.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;
mod progress;

/// Options every subcommand shares.
#[derive(Debug, Clone, clap::Args)]
pub struct GlobalOpts {
    /// Compute device: cpu, cuda, cuda:N or metal (the last two need the matching cargo feature).
    #[arg(long, global = true, default_value = "cpu")]
    pub device: String,
    /// Seed for every random draw (initialisation, shuffling, augmentation, sampling).
    #[arg(long, global = true, default_value_t = 0)]
    pub seed: u64,
    /// More logging (-v info, -vv debug, -vvv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors; no progress bars.
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

impl GlobalOpts {
    /// Opens the device named by `--device`.
    pub fn device(&self) -> anyhow::Result<derm_core::Device> {
        Ok(derm_core::parse_device(&self.device)?)
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "derm",
    version,
    about = "Dermoscopy images to clean images, lesion masks, diagnoses and saliency maps"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalOpts,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Version, enabled features and devices.
    Info(cmd::info::InfoArgs),
    /// Data sets: validate a folder against its manifest.
    #[command(subcommand)]
    Data(cmd::data::DataCommand),
    /// Draw procedural dermoscopy phantoms with exact ground truth.
    Phantom(cmd::phantom::PhantomArgs),
    /// Find hairs, rulers, ink and air bubbles, and remove them with classic inpainting.
    Hair(cmd::hair::HairArgs),
    /// Lesion segmentation with the dilated U-Net.
    #[command(subcommand)]
    Segment(cmd::segment::SegmentCommand),
    /// Occlusion removal: derm-hair finds hairs and rulers, a partial-convolution U-Net fills them.
    #[command(subcommand)]
    Purify(cmd::purify::PurifyCommand),
    /// DCGAN virtual patients for the rare classes, with the novelty check.
    #[command(subcommand)]
    Synth(cmd::synth::SynthCommand),
    /// ResNet lesion classification, scored as the ISIC challenges do.
    #[command(subcommand)]
    Classify(cmd::classify::ClassifyCommand),
    /// VisualBackProp: where a trained classifier or segmenter looks.
    Vbp(cmd::vbp::VbpArgs),
    /// One image through every stage with the models of a pipeline run.
    Analyze(cmd::analyze::AnalyzeArgs),
    /// A local web page and JSON API: analyse an image with a run's models, browse the run.
    Serve(cmd::serve::ServeArgs),
}

fn init_logging(g: &GlobalOpts) {
    let level = if g.quiet {
        "error"
    } else {
        match g.verbose {
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DERM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let g = &cli.global;
    match &cli.command {
        Command::Info(a) => a.run(g),
        Command::Data(a) => a.run(g),
        Command::Phantom(a) => a.run(g),
        Command::Hair(a) => a.run(g),
        Command::Segment(a) => a.run(g),
        Command::Purify(a) => a.run(g),
        Command::Synth(a) => a.run(g),
        Command::Classify(a) => a.run(g),
        Command::Vbp(a) => a.run(g),
        Command::Analyze(a) => a.run(g),
        Command::Serve(a) => a.run(g),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.global);
    derm_kernels::runtime::tune_allocator();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--config FILE` plus a flag, the same way in every command with a config: the flag wins,
    /// the file's other fields stay, and what neither names takes the config's default.
    #[test]
    fn flags_override_the_config_file_in_every_stage() {
        let d = tempfile::tempdir().unwrap();
        let file = |name: &str, json: &str| {
            let p = d.path().join(name);
            std::fs::write(&p, json).unwrap();
            p.display().to_string()
        };
        let parse = |args: &[&str]| {
            let mut all = vec!["derm", "--seed", "5"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).unwrap()
        };
        let train = ["train", "--root", "r", "--out", "o", "--config"];

        let c = file("segment.json", r#"{"size": 40, "batch_size": 3}"#);
        let cli = parse(&[&["segment"], &train[..], &[&c, "--size", "48"]].concat());
        let Command::Segment(cmd::segment::SegmentCommand::Train(a)) = &cli.command else { panic!("segment") };
        let cfg = a.config(&cli.global).unwrap();
        let def = derm_segment::SegmentConfig::default();
        assert_eq!((cfg.size, cfg.batch_size, cfg.train.epochs, cfg.train.seed), (48, 3, def.train.epochs, 5));

        let c = file("purify.json", r#"{"size": 40, "batch_size": 3}"#);
        let cli = parse(&[&["purify"], &train[..], &[&c, "--size", "48"]].concat());
        let Command::Purify(cmd::purify::PurifyCommand::Train(a)) = &cli.command else { panic!("purify") };
        let cfg = a.config(&cli.global).unwrap();
        let def = derm_purify::PurifyConfig::default();
        assert_eq!((cfg.size, cfg.batch_size, cfg.train.epochs, cfg.train.seed), (48, 3, def.train.epochs, 5));
        // The classic fill the purifier corrects follows `--hair-config`'s inpainting.
        let h = file("hair-fill.json", r#"{"inpaint": "telea", "inpaint_radius": 2.0}"#);
        let cli = parse(&[&["purify"], &train[..], &[&c, "--hair-config", &h]].concat());
        let Command::Purify(cmd::purify::PurifyCommand::Train(a)) = &cli.command else { panic!("purify") };
        let cfg = a.config(&cli.global).unwrap();
        assert_eq!((cfg.prior_method, cfg.prior_radius), (derm_hair::InpaintMethod::Telea, 2.0));
        assert_eq!(def.prior_method, derm_hair::HairConfig::default().inpaint);

        let c = file("classify.json", r#"{"input_size": 40, "batch_size": 3}"#);
        let cli = parse(&[&["classify"], &train[..], &[&c, "--batch", "7"]].concat());
        let Command::Classify(cmd::classify::ClassifyCommand::Train(a)) = &cli.command else { panic!("classify") };
        let cfg = a.config(&cli.global).unwrap();
        let def = derm_classify::ClassifyConfig::default();
        assert_eq!((cfg.input_size, cfg.batch_size, cfg.train.epochs, cfg.train.seed), (40, 7, def.train.epochs, 5));

        let c = file("synth.json", r#"{"batch_size": 3, "g_steps": 4}"#);
        let cli = parse(&[&["synth"], &train[..], &[&c, "--batch", "9"]].concat());
        let Command::Synth(cmd::synth::SynthCommand::Train(a)) = &cli.command else { panic!("synth") };
        let cfg = a.config(&cli.global).unwrap();
        let def = derm_synth::SynthConfig::default();
        assert_eq!((cfg.batch_size, cfg.g_steps, cfg.train.epochs, cfg.train.seed), (9, 4, def.train.epochs, 5));

        let c = file("hair.json", r#"{"size_ref": 300, "rulers": false}"#);
        let cli = parse(&["hair", "--input", "i", "--out", "o", "--config", &c, "--size-ref", "200"]);
        let Command::Hair(a) = &cli.command else { panic!("hair") };
        let cfg = a.config().unwrap();
        assert_eq!(
            (cfg.size_ref, cfg.rulers, cfg.line_length),
            (200, false, derm_hair::HairConfig::default().line_length)
        );

        // A field the config type does not have is an error naming the file.
        let c = file("bad.json", r#"{"sise": 40}"#);
        let cli = parse(&[&["segment"], &train[..], &[&c]].concat());
        let Command::Segment(cmd::segment::SegmentCommand::Train(a)) = &cli.command else { panic!("segment") };
        let e = format!("{:#}", a.config(&cli.global).unwrap_err());
        assert!(e.contains("bad.json") && e.contains("sise"), "{e}");
    }

    /// `derm segment train` trains the medium network at 3e-4 unless told otherwise; `--preset`
    /// and `--lr` choose another.
    #[test]
    fn the_segmenter_preset_and_rate_flags() {
        use derm_core::optim::LrSchedule;
        use derm_segment::UNetConfig;
        let seg = |extra: &[&str]| {
            let mut all = vec!["derm", "segment", "train", "--root", "r", "--out", "o"];
            all.extend_from_slice(extra);
            let cli = Cli::try_parse_from(all).unwrap();
            let Command::Segment(cmd::segment::SegmentCommand::Train(a)) = &cli.command else { panic!("segment") };
            a.config(&cli.global)
        };
        let def = seg(&["--minutes", "10"]).unwrap();
        assert_eq!((def.model.clone(), def.optim.optimizer.lr()), (UNetConfig::medium(), 3e-4));
        let chosen = seg(&["--preset", "small", "--lr", "1e-4"]).unwrap();
        assert_eq!((chosen.model, chosen.optim.optimizer.lr()), (UNetConfig::small(), 1e-4));
        let e = format!("{:#}", seg(&["--preset", "large"]).unwrap_err());
        assert!(e.contains("\"large\"") && e.contains("small, medium or paper"), "{e}");
        // The schedule and the loss: each flag changes only what it names.
        let other = seg(&["--schedule", "constant", "--dice-weight", "0.5", "--lovasz-weight", "0.25"]).unwrap();
        assert_eq!((other.optim.schedule, other.dice_weight, other.lovasz_weight), (LrSchedule::Constant, 0.5, 0.25));
        assert_eq!((other.model, other.optim.optimizer.lr()), (def.model, def.optim.optimizer.lr()));
        assert_ne!(def.optim.schedule, LrSchedule::Constant);
        // Free rotations and elastic warps join the segmenter's own augmentation.
        assert_eq!((def.augment.rotate, def.augment.elastic), (0.0, 0.0));
        let warped = seg(&["--rotate", "45", "--elastic", "0.03"]).unwrap();
        assert_eq!((warped.augment.rotate, warped.augment.elastic), (45.0, 0.03));
        assert_eq!(warped.augment.crop_scale, def.augment.crop_scale);
    }

    /// The config `derm classify train --root r --out o` and `extra` flags make.
    fn classify_train_config(extra: &[&str]) -> anyhow::Result<derm_classify::ClassifyConfig> {
        let mut all = vec!["derm", "classify", "train", "--root", "r", "--out", "o"];
        all.extend_from_slice(extra);
        let cli = Cli::try_parse_from(all)?;
        let Command::Classify(cmd::classify::ClassifyCommand::Train(a)) = &cli.command else { panic!("classify") };
        a.config(&cli.global)
    }

    /// `derm classify train` flips only unless `--augment full` asks for quarter turns, crops
    /// and colour jitter too, keeps a constant rate unless `--schedule` names another, mixes no
    /// batches unless `--mix` says how and decays weights only as `--optimizer` and
    /// `--weight-decay` say; each flag changes nothing else.
    #[test]
    fn the_classifier_augment_schedule_and_mix_flags() {
        use derm_data::augment::AugmentConfig;
        let cls = classify_train_config;
        let def = cls(&[]).unwrap();
        assert_eq!(def.augment, AugmentConfig::flips());
        assert!(def.augment.hflip && def.augment.vflip && !def.augment.rot90);
        let full = cls(&["--augment", "full"]).unwrap();
        assert_eq!(full.augment, AugmentConfig::default());
        assert!(full.augment.rot90 && full.augment.crop_scale[0] < 1.0 && full.augment.brightness > 0.0);
        assert_eq!((full.model, full.input_size, full.random_crop), (def.model, def.input_size, def.random_crop));
        assert!(cls(&["--augment", "heavy"]).is_err());
        // Rotations and elastic warps add to either augmentation; out-of-range ones are refused.
        let warped = cls(&["--augment", "full", "--rotate", "30", "--elastic", "0.03"]).unwrap();
        assert_eq!(warped.augment, AugmentConfig { rotate: 30.0, elastic: 0.03, ..AugmentConfig::default() });
        assert_eq!(cls(&["--rotate", "10"]).unwrap().augment.rotate, 10.0);
        assert_eq!(cls(&["--erase", "0.5"]).unwrap().augment, AugmentConfig { erase: 0.5, ..AugmentConfig::flips() });
        let e = cls(&["--elastic", "0.6"]).unwrap().validate().unwrap_err().to_string();
        assert!(e.contains("elastic"), "{e}");
        // The schedule: constant unless asked; cosine spans the run and keeps the optimiser.
        use derm_core::optim::{LrSchedule, COSINE_OVER_RUN};
        assert_eq!(def.optim.schedule, LrSchedule::Constant);
        let cos = cls(&["--schedule", "cosine", "--optimizer", "adam", "--lr", "2e-3"]).unwrap();
        assert_eq!(cos.optim.schedule, COSINE_OVER_RUN);
        assert_eq!((cos.optim.optimizer.lr(), cos.augment), (2e-3, def.augment));
        assert!(matches!(cos.optim.optimizer, derm_core::optim::OptimizerKind::Adam { .. }));
        assert!(cls(&["--schedule", "linear"]).is_err());
        // Batch mixing: off unless asked, each kind with its usual alpha unless given one.
        use derm_classify::BatchMix;
        assert_eq!(def.mix, BatchMix::Off);
        assert_eq!(cls(&["--mix", "mixup"]).unwrap().mix, BatchMix::Mixup { alpha: 0.2 });
        let cut = cls(&["--mix", "cutmix", "--mix-alpha", "0.5"]).unwrap();
        assert_eq!((cut.mix, cut.augment), (BatchMix::CutMix { alpha: 0.5 }, def.augment));
        assert!(cls(&["--mix-alpha", "0.5"]).is_err(), "an alpha without --mix");
        assert!(cls(&["--mix", "off", "--mix-alpha", "0.5"]).is_err(), "an alpha for no mixing");
        // Test-time views: saved on unless `--tta false`.
        assert!(def.test_time_augmentation);
        assert!(!cls(&["--tta", "false"]).unwrap().test_time_augmentation);
        // Weight decay: AdamW's 0.01 unless given; L2 with SGD; refused for plain Adam.
        use derm_core::optim::OptimizerKind;
        let wd = |extra: &[&str]| cls(extra).map(|c| c.optim.optimizer);
        assert_eq!(wd(&["--optimizer", "adamw", "--lr", "2e-3"]).unwrap(), OptimizerKind::adamw(2e-3, 0.01));
        assert_eq!(wd(&["--optimizer", "adamw", "--weight-decay", "0.05"]).unwrap(), OptimizerKind::adamw(1e-3, 0.05));
        let sgd = wd(&["--optimizer", "sgd", "--weight-decay", "1e-4"]).unwrap();
        assert!(matches!(sgd, OptimizerKind::Sgd { weight_decay, .. } if weight_decay == 1e-4), "{sgd:?}");
        let e = format!("{:#}", wd(&["--optimizer", "adam", "--weight-decay", "0.05"]).unwrap_err());
        assert!(e.contains("adamw"), "{e}");
        assert!(wd(&["--optimizer", "adamw", "--weight-decay", "-0.1"]).is_err());
        assert!(wd(&["--optimizer", "nadam"]).is_err());
        assert!(wd(&["--weight-decay", "1e-4"]).is_err(), "the default optimiser is plain adam");
    }

    /// `derm classify train` runs the cpu preset unless `--preset paper` (or a config file) says
    /// otherwise; `--pretrained` takes torchvision's width; the operating point is chosen unless
    /// `--select-operating-point false` or no validation part.
    #[test]
    fn the_classifier_preset_pretrained_width_and_operating_point_flags() {
        use derm_classify::ClassifyConfig;
        let cls = classify_train_config;
        let def = cls(&[]).unwrap();
        assert_eq!((def.preset_name(), def.model.name(), def.input_size), (Some("cpu"), "resnet18-w32".into(), 128));
        assert!(def.select_operating_point);
        let paper = cls(&["--preset", "paper"]).unwrap();
        assert_eq!(paper, ClassifyConfig { train: paper.train.clone(), ..ClassifyConfig::paper() });
        let e = format!("{:#}", cls(&["--preset", "gpu"]).unwrap_err());
        assert!(e.contains("cpu or paper"), "{e}");
        // Flags override the preset.
        let r50 = cls(&["--preset", "paper", "--size", "160", "--optimizer", "adam"]).unwrap();
        assert_eq!(
            (r50.model.name(), r50.input_size, r50.resize, r50.preset_name()),
            ("resnet50".into(), 160, 183, None)
        );
        // `--arch` changes the layout, not the width.
        let r34 = cls(&["--arch", "resnet34"]).unwrap();
        assert_eq!((r34.model.name(), r34.model.base_width), ("resnet34-w32".into(), 32));
        assert_eq!(cls(&["--preset", "paper", "--arch", "resnet18"]).unwrap().model.name(), "resnet18");
        // A space-to-depth stem: 1 unless given, kept by `--arch`; a size it does not divide and
        // ImageNet weights are refused.
        assert_eq!(def.model.space_to_depth, 1);
        let s2d = cls(&["--space-to-depth", "2", "--size", "224", "--arch", "resnet34"]).unwrap();
        assert_eq!((s2d.model.name(), s2d.resize), ("resnet34-w32-s2d2".into(), 256));
        assert!(s2d.validate().is_ok());
        assert!(cls(&["--space-to-depth", "2", "--size", "223"]).unwrap().validate().is_err());
        assert!(cls(&["--space-to-depth", "2", "--pretrained", "w.safetensors"]).unwrap().validate().is_err());
        // ImageNet weights: width 64 and trained residual branches, whatever the preset.
        let pre = cls(&["--pretrained", "w.safetensors"]).unwrap();
        assert_eq!((pre.model.base_width, pre.model.zero_init_residual), (64, false));
        assert_eq!(cls(&["--pretrained", "w.safetensors", "--width", "16"]).unwrap().model.base_width, 16);
        // The operating point.
        assert!(!cls(&["--select-operating-point", "false"]).unwrap().select_operating_point);
        assert!(cls(&["--select-operating-point"]).unwrap().select_operating_point);
        assert!(!cls(&["--val-fraction", "0"]).unwrap().select_operating_point);
        let asked = cls(&["--val-fraction", "0", "--select-operating-point"]).unwrap();
        assert!(asked.select_operating_point, "asked for: training then says there is no validation part");
        // The lesion-mask loss: on (weight 1) unless a weight is given.
        assert_eq!(def.aux_mask_weight, 1.0);
        assert_eq!(cls(&["--aux-mask-weight", "0"]).unwrap().aux_mask_weight, 0.0);
        assert_eq!(cls(&["--aux-mask-weight", "0.5"]).unwrap().aux_mask_weight, 0.5);
        use derm_classify::Stage;
        assert_eq!(def.aux_mask_stage, Stage::Layer3);
        assert_eq!(cls(&["--aux-mask-stage", "layer4"]).unwrap().aux_mask_stage, Stage::Layer4);
        for bad in ["fc", "conv1", "layer9"] {
            assert!(cls(&["--aux-mask-stage", bad]).unwrap_err().to_string().contains("layer1, layer2"));
            assert!(cls(&["--aux-mask-second-stage", bad]).unwrap_err().to_string().contains("layer1, layer2"));
        }
        // A second stage for the head: none unless named; the head's own stage is refused.
        assert_eq!(def.aux_mask_second_stage, None);
        let two = cls(&["--aux-mask-second-stage", "layer2"]).unwrap();
        assert!(two.aux_mask_second_stage == Some(Stage::Layer2) && two.validate().is_ok());
        assert!(cls(&["--aux-mask-second-stage", "layer3"]).unwrap().validate().is_err());
        assert!(cls(&["--aux-mask-second-stage", "layer2", "--aux-mask-weight", "0"]).unwrap().validate().is_err());
        // Lesion-weighted pooling: off unless asked for; without the head the config is refused.
        assert!(!def.lesion_pooling);
        let pooled = cls(&["--lesion-pooling"]).unwrap();
        assert!(pooled.lesion_pooling && pooled.validate().is_ok());
        assert!(cls(&["--lesion-pooling", "--aux-mask-weight", "0"]).unwrap().validate().is_err());
        // The per-cell diagnosis: off unless a weight is given; it needs the head.
        assert_eq!(def.aux_cell_weight, 0.0);
        let cells = cls(&["--aux-cell-weight", "0.5"]).unwrap();
        assert!(cells.aux_cell_weight == 0.5 && cells.validate().is_ok());
        assert!(cls(&["--aux-cell-weight", "1", "--aux-mask-weight", "0"]).unwrap().validate().is_err());
        assert!(cls(&["--aux-cell-weight=-1"]).unwrap().validate().is_err());
        // The lesion descriptors: off unless a weight is given; they need the head.
        assert_eq!(def.aux_descriptor_weight, 0.0);
        let described = cls(&["--aux-descriptor-weight", "0.5"]).unwrap();
        assert!(described.aux_descriptor_weight == 0.5 && described.validate().is_ok());
        assert!(described.describe().contains("lesion descriptors (weight 0.5)"));
        assert!(cls(&["--aux-descriptor-weight", "1", "--aux-mask-weight", "0"]).unwrap().validate().is_err());
        assert!(cls(&["--aux-descriptor-weight=-1"]).unwrap().validate().is_err());
        // Dropout before fc: off unless given, a probability below 1.
        assert_eq!(def.dropout, 0.0);
        assert_eq!(cls(&["--dropout", "0.3"]).unwrap().dropout, 0.3);
        assert!(cls(&["--dropout", "1"]).unwrap().validate().is_err());
        // Sharpness-aware steps: off unless a radius is given, a radius not below 0.
        assert_eq!(def.sam_rho, 0.0);
        assert_eq!(cls(&["--sam", "0.05"]).unwrap().sam_rho, 0.05);
        assert!(cls(&["--sam=-0.1"]).unwrap().validate().is_err());
    }

    /// `derm classify eval` and `predict` use the model's saved test-time views unless `--tta`
    /// says otherwise; `--tta` alone still means true.
    #[test]
    fn the_classifier_test_time_flag_of_eval_and_predict() {
        let tta = |args: Vec<&str>| match Cli::try_parse_from(args).unwrap().command {
            Command::Classify(cmd::classify::ClassifyCommand::Eval(a)) => a.tta,
            Command::Classify(cmd::classify::ClassifyCommand::Predict(a)) => a.tta,
            _ => panic!("classify eval or predict"),
        };
        let eval = ["derm", "classify", "eval", "--model", "m", "--root", "r"];
        let predict = ["derm", "classify", "predict", "--model", "m", "--input", "i"];
        for base in [&eval, &predict] {
            assert_eq!(tta([&base[..], &[]].concat()), None, "{base:?}");
            assert_eq!(tta([&base[..], &["--tta"]].concat()), Some(true), "{base:?}");
            assert_eq!(tta([&base[..], &["--tta", "false"]].concat()), Some(false), "{base:?}");
        }
    }
}
