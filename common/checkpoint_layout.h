// Where a run's files live on disk: the one place that names checkpoint directories
// (step-NNNNNNNN), the `latest` pointer beside them, and the worker daemon's attempt directories.
// The trainer writes this layout, the daemon reads and seeds it, the coordinator's checkpoint store
// reuses the step naming, and lomoctl local asks here where the worker trained.
//
//   <output.dir>/checkpoints/step-00000020/      a committed checkpoint (renamed into place whole)
//   <output.dir>/checkpoints/.tmp-step-00000020/ one being written
//   <output.dir>/checkpoints/latest              one line: the newest committed directory's name
//
//   <work dir>/jobs/<job id>/attempt-<n>/job.yaml       the spec the training child runs
//   <work dir>/jobs/<job id>/attempt-<n>/protocol.jsonl the child's report (trainer_protocol.h)
//   <work dir>/jobs/<job id>/attempt-<n>/out/           the child's output.dir
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

namespace lomo {

// "step-00000020": zero-padded to eight digits so that names sort by step up to 10^8 steps.
std::string checkpoint_directory_name(int64_t step);
// The step a name of checkpoint_directory_name's form stands for; nullopt for any other name
// (".tmp-step-…", "latest", "step-", "step-12a", more than 18 digits).
std::optional<int64_t> checkpoint_step_from_name(std::string_view name);

// Checkpoints of a run: <output_dir>/checkpoints.
std::filesystem::path checkpoints_directory(const std::filesystem::path& output_dir);
// <checkpoints_dir>/step-NNNNNNNN.
std::filesystem::path checkpoint_directory(const std::filesystem::path& checkpoints_dir,
                                           int64_t step);
// Where a checkpoint is assembled before it is renamed to its final name: a crash leaves this
// behind, never a half-written step-NNNNNNNN.
std::filesystem::path temporary_checkpoint_directory(const std::filesystem::path& checkpoints_dir,
                                                     int64_t step);
// Where the coordinator assembles one upload of a step: temporary_checkpoint_directory's name
// followed by the uploading connection and the job attempt (".tmp-step-00000100.upload-3-2"). Two
// uploads of one step (one being abandoned, the next starting) never share a directory, so the
// cleanup of one cannot remove the other's files.
std::filesystem::path temporary_upload_directory(const std::filesystem::path& checkpoints_dir,
                                                 int64_t step, uint64_t connection,
                                                 int64_t attempt);
// A name of temporary_checkpoint_directory's or temporary_upload_directory's form (".tmp-…"):
// never a committed checkpoint.
bool is_temporary_checkpoint_name(std::string_view name);
// <checkpoints_dir>/latest: names the newest committed checkpoint directory (one line).
std::filesystem::path latest_checkpoint_pointer(const std::filesystem::path& checkpoints_dir);
// Points <checkpoints_dir>/latest at checkpoint_directory(checkpoints_dir, step), atomically and
// durably (temporary file, fsync, rename, fsync of the directory): a crash leaves the old pointer
// or the new one, never an empty or partial one. The trainer calls it after renaming a checkpoint
// into place, the worker daemon after fetching one. Throws std::system_error.
void write_latest_checkpoint(const std::filesystem::path& checkpoints_dir, int64_t step);
// The directory `latest` names, nullopt when there is no pointer file. Throws std::runtime_error
// when the pointer names something that is not a checkpoint directory beside it.
std::optional<std::filesystem::path> read_latest_checkpoint(
    const std::filesystem::path& checkpoints_dir);

// <work dir>/jobs/<job id>/attempt-<n>: characters of the job id other than [A-Za-z0-9._-] become
// '_' so that an id can never climb out of the work directory.
std::filesystem::path attempt_directory(const std::filesystem::path& work_dir,
                                        const std::string& job_id, int64_t attempt);
// Inside an attempt directory: the training child's output.dir, its job file, and the file it
// reports through (trainer_protocol.h).
std::filesystem::path attempt_output_directory(const std::filesystem::path& attempt_dir);
std::filesystem::path attempt_job_file(const std::filesystem::path& attempt_dir);
std::filesystem::path attempt_protocol_file(const std::filesystem::path& attempt_dir);

}  // namespace lomo
