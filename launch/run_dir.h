// The training output directory as the HF Trainer lays it out: atomic
// checkpoint-<step>/ directories, rotation, and finding the checkpoint to
// resume from. Only rank 0 calls the writing functions.
//
// Protocol of a checkpoint write (crash-safe at every point):
//   1. create <output_dir>/.checkpoint-<step>.tmp-<pid>/ and write every file into it
//   2. fsync each file, then the directory
//   3. rename it to checkpoint-<step>/ (replacing none: a same-named one is moved aside first)
//   4. fsync output_dir
//   5. only then rotate: remove the oldest complete checkpoints beyond save_total_limit,
//      never the one just written.
// A reader treats a directory as complete when its name is checkpoint-<int> and
// its trainer_state.json parses; .tmp directories are incomplete and removed.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/safetensors.h"  // write_file_atomic

namespace dpo {

/// Writes a checkpoint: `write_files(tmp_dir)` fills a fresh temporary dir, which
/// is then fsynced and renamed to <output_dir>/checkpoint-<step>. Returns the
/// final path. Throws (naming the path and the OS error) and removes the
/// temporary dir on any failure, leaving earlier checkpoints untouched.
std::string checkpoint_commit(const std::string& output_dir, int64_t step,
                              const std::function<void(const std::string& tmp_dir)>& write_files);

/// Complete checkpoints in output_dir, oldest first, as (step, path).
std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& output_dir);

/// Removes leftover temporary checkpoint dirs (from a killed run). Returns how many.
int remove_incomplete_checkpoints(const std::string& output_dir);

/// Keeps the newest `limit` checkpoints (0 = keep all); never removes `keep_path`.
void rotate_checkpoints(const std::string& output_dir, int64_t limit, const std::string& keep_path);

/// Resolves --resume_from_checkpoint: "" -> "" (fresh start); "auto" -> newest
/// complete checkpoint or "" when there is none; DIR -> DIR, which must be a
/// complete checkpoint (else throws naming what is missing).
std::string resolve_resume(const std::string& arg, const std::string& output_dir);

/// fsyncs a file or directory by path (throws on error).
void fsync_path(const std::string& path);

}  // namespace dpo
