//! Users are split into slices; each slice lives in one pair of cells (the
//! routing table's `slice_pair`). Routers route by it, cells count by it.

/// Most slices a table may have.
pub const SLICES_MAX: u32 = 65_536;

/// The slice of a user: a fixed mix of the id, so that consecutive ids
/// spread over slices. Stable forever: changing it moves every user.
pub fn slice_of(user_id: u64, slice_count: u32) -> u32 {
    let mut x = user_id.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    (x % u64::from(slice_count.max(1))) as u32
}
