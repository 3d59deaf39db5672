//! Model-based property test of the engine: random writes, reads, flushes, discards,
//! write-zeroes, drains and clean re-opens, with 512-byte and 4 KiB logical blocks, against a
//! plain byte array. Every read must match the model; after a final drain the backing device
//! alone must equal it.

use proptest::prelude::*;
use wb_tests::{Model, Rig};

#[derive(Debug, Clone)]
enum Op {
    Write {
        unit: u64,
        units: u64,
        seed: u8,
        fua: bool,
    },
    Read {
        unit: u64,
        units: u64,
    },
    Flush,
    Discard {
        unit: u64,
        units: u64,
    },
    WriteZeroes {
        unit: u64,
        units: u64,
    },
    Drain,
    Reopen,
}

/// Backing device size: larger than the 16-segment cache, so back-pressure and writeback occur.
const BACKING_BYTES: u64 = 12 << 20;

fn ops(lbs: u64) -> impl Strategy<Value = Vec<Op>> {
    let units_total = BACKING_BYTES / lbs;
    let max_units = (64 * 1024 / lbs).max(1);
    // Concentrate on a hot region half the time so rewrites and in-place overwrites happen.
    let unit = prop_oneof![0..units_total, 0..(256 * 1024 / lbs)];
    let span = (unit, 1..=max_units).prop_map(move |(u, n)| (u.min(units_total - n), n));
    let op = prop_oneof![
        40 => (span.clone(), any::<u8>(), prop::bool::weighted(0.05))
            .prop_map(|((unit, units), seed, fua)| Op::Write { unit, units, seed, fua }),
        25 => span.clone().prop_map(|(unit, units)| Op::Read { unit, units }),
        8 => Just(Op::Flush),
        5 => span.clone().prop_map(|(unit, units)| Op::Discard { unit, units }),
        5 => span.prop_map(|(unit, units)| Op::WriteZeroes { unit, units }),
        1 => Just(Op::Drain),
        2 => Just(Op::Reopen),
    ];
    prop::collection::vec(op, 1..250)
}

fn pattern(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let x = offset + i as u64;
            (x.wrapping_mul(31) ^ (x >> 9) ^ seed as u64) as u8 | 1
        })
        .collect()
}

fn run(lbs: u32, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rig = Rig::new(2, 16, BACKING_BYTES, lbs);
    let mut model = Model::from_image(rig.backing.snapshot());
    let mut engine = rig.open();
    let lbs = lbs as u64;
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Write {
                unit,
                units,
                seed,
                fua,
            } => {
                let data = pattern(seed, unit * lbs, (units * lbs) as usize);
                engine.write(unit * lbs, &data, fua).unwrap();
                model.write((unit * lbs) as usize, &data);
            }
            Op::Read { unit, units } => {
                let mut buf = vec![0u8; (units * lbs) as usize];
                engine.read(unit * lbs, &mut buf).unwrap();
                let expect = &model.data[(unit * lbs) as usize..((unit + units) * lbs) as usize];
                prop_assert!(
                    buf == expect,
                    "step {step}: read of {units} units at {unit} differs"
                );
            }
            Op::Flush => engine.flush().unwrap(),
            Op::Discard { unit, units } => {
                engine.discard(unit * lbs, units * lbs).unwrap();
                model.zero((unit * lbs) as usize, (units * lbs) as usize);
            }
            Op::WriteZeroes { unit, units } => {
                engine.write_zeroes(unit * lbs, units * lbs).unwrap();
                model.zero((unit * lbs) as usize, (units * lbs) as usize);
            }
            Op::Drain => engine
                .drain(std::time::Duration::from_millis(10), |_| {})
                .unwrap(),
            Op::Reopen => {
                engine.shutdown().unwrap();
                drop(engine);
                engine = rig.open();
            }
        }
    }
    // Everything reads back, then drains to the backing device, which alone equals the model.
    let mut all = vec![0u8; BACKING_BYTES as usize];
    engine.read(0, &mut all).unwrap();
    prop_assert!(all == model.data, "final full read differs from the model");
    engine
        .drain(std::time::Duration::from_millis(10), |_| {})
        .unwrap();
    let status = engine.status();
    prop_assert_eq!(status.dirty_bytes, 0);
    engine.shutdown().unwrap();
    prop_assert!(
        rig.backing.snapshot() == model.data,
        "backing after drain differs"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 200, .. ProptestConfig::default() })]

    #[test]
    fn engine_matches_model_4k(ops in ops(4096)) {
        run(4096, ops)?;
    }

    #[test]
    fn engine_matches_model_512(ops in ops(512)) {
        run(512, ops)?;
    }
}
