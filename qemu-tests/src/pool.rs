//! The thin pool's metadata as the tests see it from outside the device: where LVM put the
//! metadata LV on the disk (asked in the running guest), a copy read from the stopped device's
//! overlay and checked with the host's own `thin_check` (an independent judge of what a crash
//! left), and a deliberate, repairable damage for the self-repair test.
//!
//! Two kinds of harm, made on the stopped device's disk:
//! - a **leak** ([`leak`]): one free data block marked used in the data space map, every count
//!   and checksum kept consistent: exactly what a crash between a data allocation and the
//!   pool's next metadata commit leaves, made on purpose instead of by chance;
//! - **damage** ([`damage`]): the metadata space map's index block overwritten. `thin_check`
//!   rejects that as fatal even with `--ignore-non-fatal-errors`, and `thin_repair` rebuilds
//!   the space maps from the mapping trees, which stay intact.
//!
//! The on-disk format is dm-persistent-data's (the kernel's `dm-thin-metadata.c` and
//! `dm-space-map-common.c`): 4 KiB blocks, each with a CRC-32C over all but its first four
//! bytes, XORed with a constant per kind of block.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail, ensure};

use crate::vm::Vm;

/// dm-thin's metadata block size.
const BLOCK: u64 = 4096;
/// `THIN_SUPERBLOCK_MAGIC` (drivers/md/dm-thin-metadata.c).
const SUPERBLOCK_MAGIC: u64 = 27_022_010;
/// The superblock's data space map root (`struct disk_sm_root`: nr_blocks, nr_allocated,
/// bitmap_root, ref_count_root) starts at byte 64, the metadata space map's at 192.
const DATA_SM_ROOT: usize = 64;
/// Offset of the superblock's `metadata_space_map_root.bitmap_root`: the metadata space map's
/// index block.
const METADATA_SM_INDEX: usize = 192 + 16;
/// The XOR each kind of block's checksum is combined with.
const SUPERBLOCK_CSUM_XOR: u32 = 160_774;
const BTREE_CSUM_XOR: u32 = 121_107;
const BITMAP_CSUM_XOR: u32 = 240_779;
/// A bitmap block: a 16-byte header, then two bits per block.
const BITMAP_HEADER: usize = 16;
const ENTRIES_PER_BITMAP: u64 = (BLOCK - BITMAP_HEADER as u64) * 4;
/// btree node flags and layout: a 32-byte header, then `max_entries` keys, then the values.
const LEAF_NODE: u32 = 2;
const NODE_HEADER: usize = 32;

/// Where one LV lies on the whole disk: (byte offset, byte length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

/// Asks LVM in the running guest where `vg/lv` (hidden LVs too, e.g. `pool_tmeta`) lies on
/// the disk. It must be one contiguous segment on one PV.
pub fn locate(vm: &Vm, vg: &str, lv: &str) -> Result<Extent> {
    let ranges = vm.ssh(&format!("lvs -a --noheadings -o seg_pe_ranges {vg}/{lv}"))?;
    let ranges: Vec<&str> = ranges.split_whitespace().collect();
    let [range] = ranges[..] else {
        bail!("{vg}/{lv} is not one segment: {ranges:?}");
    };
    let (pv, pes) = range
        .rsplit_once(':')
        .with_context(|| format!("unexpected PE range {range:?}"))?;
    let (first, last) = pes
        .split_once('-')
        .with_context(|| format!("unexpected PE range {range:?}"))?;
    let (first, last): (u64, u64) = (first.parse()?, last.parse()?);
    let number = |cmd: String| -> Result<u64> {
        let out = vm.ssh(&cmd)?;
        out.trim()
            .parse()
            .with_context(|| format!("`{cmd}` said {out:?}"))
    };
    let pe_start = number(format!(
        "pvs --noheadings --units b --nosuffix -o pe_start {pv}"
    ))?;
    let extent = number(format!(
        "vgs --noheadings --units b --nosuffix -o vg_extent_size {vg}"
    ))?;
    let part = pv
        .strip_prefix("/dev/")
        .with_context(|| format!("PV {pv} is not under /dev"))?;
    let part_start = number(format!("cat /sys/class/block/{part}/start"))? * 512;
    Ok(Extent {
        offset: part_start + pe_start + first * extent,
        len: (last - first + 1) * extent,
    })
}

/// What the host's `thin_check` says of a copy of pool metadata. The host runs the device's own
/// version (Debian trixie's thin-provisioning-tools, unpacked by `scripts/bootstrap.sh
/// --image`): bookworm's 0.9 does not even notice a leaked data block.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// `thin_check` without options exited 0: nothing at all wrong.
    pub clean: bool,
    /// It reported leaked blocks (non-fatal: the device's LVM lets them through).
    pub leaks: bool,
    /// `thin_check --ignore-non-fatal-errors` exited 0: the device's LVM activates it.
    pub activates: bool,
    pub said: String,
}

/// Reads the metadata LV at `meta` from the stopped device's disk and runs the host's
/// `thin_check` over it, strictly and as the device's LVM does.
pub fn check(vm: &Vm, meta: Extent) -> Result<Verdict> {
    let copy = vm.dir.join("pool_tmeta.bin");
    fs::write(&copy, vm.read_disk(meta.offset, meta.len)?)?;
    let strict = thin_check(&copy, &[])?;
    let lenient = thin_check(&copy, &["--ignore-non-fatal-errors"])?;
    let _ = fs::remove_file(&copy);
    let leaks = strict.1.contains("leak");
    Ok(Verdict {
        clean: strict.0 == 0 && !leaks,
        leaks,
        activates: lenient.0 == 0,
        said: strict.1.trim().to_owned(),
    })
}

fn thin_check(file: &Path, options: &[&str]) -> Result<(i32, String)> {
    let out = Command::new(fleet_e2e::tool("thin_check"))
        .args(options)
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .context("running the host's thin_check")?;
    let mut said = String::from_utf8_lossy(&out.stdout).into_owned();
    said.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.code().unwrap_or(-1), said))
}

/// Damages the metadata at `meta` on the stopped device's disk beyond what
/// `--ignore-non-fatal-errors` lets through, in a way `thin_repair` can rebuild. Returns the
/// metadata block overwritten.
pub fn damage(vm: &Vm, meta: Extent) -> Result<u64> {
    let mut superblock = vm.read_disk(meta.offset, BLOCK)?;
    superblock.resize(meta.len as usize, 0);
    let index = damage_in(&mut superblock)?;
    let at = (index * BLOCK) as usize;
    vm.write_disk(
        meta.offset + index * BLOCK,
        &superblock[at..at + BLOCK as usize],
    )?;
    Ok(index)
}

/// Overwrites the metadata space map's index block (found through the superblock, the first
/// block of `meta`) with garbage. Returns its block number.
fn damage_in(meta: &mut [u8]) -> Result<u64> {
    let u64_at = |at: usize| u64::from_le_bytes(meta[at..at + 8].try_into().unwrap());
    ensure!(
        u64_at(32) == SUPERBLOCK_MAGIC,
        "no thin-pool superblock (magic {})",
        u64_at(32)
    );
    let index = u64_at(METADATA_SM_INDEX);
    ensure!(
        index > 0 && (index + 1) * BLOCK <= meta.len() as u64,
        "the metadata space map's index block {index} is outside the metadata"
    );
    let at = (index * BLOCK) as usize;
    for (i, byte) in meta[at..at + BLOCK as usize].iter_mut().enumerate() {
        *byte = (i * 37 % 251) as u8;
    }
    Ok(index)
}

/// Leaks one data block of the pool whose metadata is at `meta` on the stopped device's disk.
/// Returns the data block leaked.
pub fn leak(vm: &Vm, meta: Extent) -> Result<u64> {
    let mut bytes = vm.read_disk(meta.offset, meta.len)?;
    let (block, changed) = leak_in(&mut bytes)?;
    for b in changed {
        let at = (b * BLOCK) as usize;
        vm.write_disk(meta.offset + b * BLOCK, &bytes[at..at + BLOCK as usize])?;
    }
    Ok(block)
}

/// Marks the first free data block of `meta` (a whole metadata device) used: its two bits in
/// the bitmap, the index entry's free count, the space map's allocated count, and the three
/// blocks' checksums. Returns the data block and the metadata blocks changed.
fn leak_in(meta: &mut [u8]) -> Result<(u64, Vec<u64>)> {
    let block = |b: u64| (b * BLOCK) as usize..((b + 1) * BLOCK) as usize;
    let u64_at = |m: &[u8], at: usize| u64::from_le_bytes(m[at..at + 8].try_into().unwrap());
    let u32_at = |m: &[u8], at: usize| u32::from_le_bytes(m[at..at + 4].try_into().unwrap());
    ensure!(
        meta.len() as u64 >= BLOCK && u64_at(meta, 32) == SUPERBLOCK_MAGIC,
        "no thin-pool superblock"
    );
    let nr_blocks = u64_at(meta, DATA_SM_ROOT);
    let index_root = u64_at(meta, DATA_SM_ROOT + 16);
    // The data space map's index is a btree of `disk_index_entry` (blocknr, nr_free,
    // none_free_before); a pool of this size has it in one leaf.
    let node = &meta[block(index_root)];
    ensure!(
        u32_at(node, 4) & LEAF_NODE != 0,
        "the data space map's index is deeper than one leaf"
    );
    let entries = u32_at(node, 16) as usize;
    let max = u32_at(node, 20) as usize;
    ensure!(u32_at(node, 24) == 16, "unexpected index entry size");
    for i in 0..entries {
        let key = u64_at(node, NODE_HEADER + i * 8);
        let value = NODE_HEADER + max * 8 + i * 16;
        let bitmap = u64_at(node, value);
        let nr_free = u32_at(node, value + 8);
        if nr_free == 0 {
            continue;
        }
        let bits = &meta[block(bitmap)];
        let free = (0..ENTRIES_PER_BITMAP)
            .take_while(|e| key * ENTRIES_PER_BITMAP + e < nr_blocks)
            .find(|&e| {
                let byte = bits[BITMAP_HEADER + (e / 4) as usize];
                (byte >> ((e % 4) * 2)) & 0b11 == 0
            });
        let Some(e) = free else { continue };
        // Two bits per entry, the low-order bit of the count in the higher bit: count 1 sets
        // bit (e % 4) * 2 + 1 of the entry's byte.
        let at = bitmap as usize * BLOCK as usize + BITMAP_HEADER + (e / 4) as usize;
        meta[at] |= 1 << ((e % 4) * 2 + 1);
        seal(&mut meta[block(bitmap)], BITMAP_CSUM_XOR);
        let at = index_root as usize * BLOCK as usize + value + 8;
        meta[at..at + 4].copy_from_slice(&(nr_free - 1).to_le_bytes());
        seal(&mut meta[block(index_root)], BTREE_CSUM_XOR);
        let allocated = u64_at(meta, DATA_SM_ROOT + 8) + 1;
        meta[DATA_SM_ROOT + 8..DATA_SM_ROOT + 16].copy_from_slice(&allocated.to_le_bytes());
        seal(&mut meta[block(0)], SUPERBLOCK_CSUM_XOR);
        return Ok((key * ENTRIES_PER_BITMAP + e, vec![0, index_root, bitmap]));
    }
    bail!("the pool has no free data block to leak")
}

/// Writes a metadata block's checksum: CRC-32C over all but the first four bytes, in the
/// kernel's form (no final inversion), XORed with the block kind's constant.
fn seal(block: &mut [u8], xor: u32) {
    let sum = !crc32c(&block[4..]) ^ xor;
    block[..4].copy_from_slice(&sum.to_le_bytes());
}

/// CRC-32C (Castagnoli), as the `crc32c` check value 0xe3069283 defines it.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// Metadata of one thin device with four mapped blocks, made by the host's `thin_restore`
    /// in `dir`.
    fn restored(dir: &Path) -> Result<PathBuf> {
        fs::create_dir_all(dir)?;
        let xml = dir.join("meta.xml");
        fs::write(
            &xml,
            r#"<superblock uuid="" time="0" transaction="1" flags="0" version="2" data_block_size="128" nr_data_blocks="40000">
  <device dev_id="1" mapped_blocks="4" transaction="0" creation_time="0" snap_time="0">
    <range_mapping origin_begin="0" data_begin="0" length="4" time="0"/>
  </device>
</superblock>
"#,
        )?;
        let file = dir.join("meta.bin");
        fs::write(&file, vec![0u8; 8 << 20])?;
        let out = Command::new(fleet_e2e::tool("thin_restore"))
            .arg("-i")
            .arg(&xml)
            .arg("-o")
            .arg(&file)
            .output()
            .context("running the host's thin_restore")?;
        ensure!(out.status.success(), "thin_restore: {out:?}");
        let (clean, said) = thin_check(&file, &[])?;
        ensure!(
            clean == 0 && !said.contains("leak"),
            "fresh metadata: {said}"
        );
        Ok(file)
    }

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("fleet-pool-{name}-{}", std::process::id()))
    }

    #[test]
    fn crc32c_matches_its_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    /// A leak made by [`leak_in`] is exactly what a crash leaves: the host's `thin_check`
    /// finds one leaked data block and nothing fatal.
    #[test]
    fn a_leak_made_on_purpose_is_exactly_a_non_fatal_leak() -> Result<()> {
        let dir = temp("leak");
        let file = restored(&dir)?;
        let mut meta = fs::read(&file)?;
        let (leaked, changed) = leak_in(&mut meta)?;
        assert_eq!(leaked, 4, "the first free data block");
        assert_eq!(changed.len(), 3);
        fs::write(&file, &meta)?;
        let (strict, said) = thin_check(&file, &[])?;
        assert!(
            strict != 0 && said.contains("1 data blocks have leaked"),
            "{strict}: {said}"
        );
        let (lenient, said) = thin_check(&file, &["--ignore-non-fatal-errors"])?;
        assert_eq!(lenient, 0, "{said}");
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// Damage made by [`damage_in`] is fatal to the device's check but `thin_repair` (what
    /// `lvconvert --repair` runs) makes metadata that passes it again.
    #[test]
    fn damage_made_on_purpose_is_fatal_but_repairable() -> Result<()> {
        let dir = temp("damage");
        let file = restored(&dir)?;
        let mut meta = fs::read(&file)?;
        damage_in(&mut meta)?;
        fs::write(&file, &meta)?;
        let (lenient, said) = thin_check(&file, &["--ignore-non-fatal-errors"])?;
        assert_ne!(lenient, 0, "the damage passes: {said}");
        let repaired = dir.join("repaired.bin");
        fs::write(&repaired, vec![0u8; 8 << 20])?;
        let out = Command::new(fleet_e2e::tool("thin_repair"))
            .arg("-i")
            .arg(&file)
            .arg("-o")
            .arg(&repaired)
            .output()?;
        assert!(out.status.success(), "thin_repair: {out:?}");
        let (strict, said) = thin_check(&repaired, &[])?;
        assert_eq!(strict, 0, "{said}");
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
