//! The gateway's RLE mask decoder on arbitrary masks: never a panic, never more pixels than
//! the size allows, and what it accepts re-encodes to the same pixels.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mp_proto::rle;
use mp_proto::v1::RleMask;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let width = u32::from(u16::from_le_bytes([data[0], data[1]]));
    let height = u32::from(u16::from_le_bytes([data[2], data[3]]));
    let mut values = Vec::new();
    let mut lengths = Vec::new();
    for ch in data[4..].chunks_exact(5) {
        values.push(i32::from(ch[0] as i8));
        lengths.push(u32::from_le_bytes([ch[1], ch[2], ch[3], ch[4]]));
    }
    let m = RleMask {
        width,
        height,
        values,
        lengths,
    };
    if let Ok(v) = rle::decode(&m) {
        assert_eq!(v.len() as u64, u64::from(width) * u64::from(height));
        assert_eq!(rle::decode(&rle::encode(width, height, &v)).unwrap(), v);
    }
});
