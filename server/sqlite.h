// A thin RAII layer over the SQLite C API: one Connection per thread at a time (SQLite's
// multi-thread mode), prepared statements cached per connection, errors as exceptions that quote
// SQLite's own message.
#pragma once

#include <sqlite3.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>

namespace lomo::server::sqlite {

class Error : public std::runtime_error {
 public:
  Error(const std::string& what, int code) : std::runtime_error(what), code_(code) {}
  int code() const { return code_; }  // SQLITE_* (extended)

 private:
  int code_;
};

class Statement {
 public:
  Statement(sqlite3* db, sqlite3_stmt* statement) : db_(db), statement_(statement) {}
  ~Statement();
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;

  // Binding is 1-based, as in SQLite.
  Statement& bind(int index, int64_t value);
  Statement& bind(int index, double value);
  Statement& bind(int index, std::string_view text);
  Statement& bind_blob(int index, std::string_view bytes);
  Statement& bind_null(int index);
  // True while a row is available; false when done. Throws Error otherwise.
  bool step();
  // Runs a statement that returns no rows.
  void run();
  // Resets for the next use and clears bindings (done automatically by Connection::prepare).
  void reset();

  int64_t column_int(int column) const;
  double column_double(int column) const;
  std::string column_text(int column) const;
  std::string column_blob(int column) const;
  bool column_is_null(int column) const;

 private:
  sqlite3* db_;
  sqlite3_stmt* statement_;
};

// A prepared statement in use: resets it when it goes out of scope, so that a statement stopped
// before its last row does not keep its read snapshot (and the WAL) pinned.
class StatementLease {
 public:
  explicit StatementLease(Statement& statement) : statement_(&statement) {}
  ~StatementLease() {
    if (statement_ != nullptr) statement_->reset();
  }
  StatementLease(StatementLease&& other) noexcept : statement_(other.statement_) {
    other.statement_ = nullptr;
  }
  StatementLease(const StatementLease&) = delete;
  StatementLease& operator=(const StatementLease&) = delete;
  StatementLease& operator=(StatementLease&&) = delete;

  Statement* operator->() const { return statement_; }
  Statement& operator*() const { return *statement_; }

 private:
  Statement* statement_;
};

class Connection {
 public:
  // Opens (creating when `create`) the database at `path`; applies busy_timeout.
  Connection(const std::filesystem::path& path, bool create);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // A cached prepared statement with bindings cleared. Never hold two leases on the same SQL.
  StatementLease prepare(const std::string& sql);
  // Runs one or more statements that return no rows (schema, pragmas, BEGIN/COMMIT).
  void exec(const std::string& sql);
  int64_t changes() const;

  sqlite3* handle() { return db_; }

 private:
  sqlite3* db_ = nullptr;
  std::unordered_map<std::string, std::unique_ptr<Statement>> statements_;
};

// BEGIN (IMMEDIATE for writers, DEFERRED for a consistent read) ... COMMIT, rolled back unless
// commit() ran.
class Transaction {
 public:
  enum class Kind { kRead, kWrite };
  Transaction(Connection& connection, Kind kind);
  ~Transaction();
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;
  void commit();

 private:
  Connection& connection_;
  bool open_ = true;
};

}  // namespace lomo::server::sqlite
