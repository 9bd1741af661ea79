// SPDX-License-Identifier: MIT
/// @file tensor.hpp
/// @brief Row-major matrices: non-owning views and owning buffers, templated on <T, Device>.
///
/// Everything in mxd is a row-major matrix [rows, cols]; vectors are [1, n]. A View never owns;
/// a Tensor owns and hands out views. Shapes travel with views so every entry point can check them.
///
///     mxd::Tensor<float> x(B, d_in);        // zero-initialised host buffer
///     x(0, 3) = 1.f;                        // element access (host tensors only)
///     mxd::View<const float> xv = x.view(); // what the layer functions take
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <type_traits>
#include <utility>

#include "config.hpp"
#include "device.hpp"
#include "error.hpp"

namespace mxd {

/// A non-owning row-major matrix [rows, cols] with leading dimension `ld` (>= cols).
template <class T, class Device = cpu>
struct View {
  T* data = nullptr;
  index_t rows = 0, cols = 0, ld = 0;

  View() = default;
  View(T* d, index_t r, index_t c) : data(d), rows(r), cols(c), ld(c) {}
  View(T* d, index_t r, index_t c, index_t ld_) : data(d), rows(r), cols(c), ld(ld_) {}
  /// A View<T> converts to a View<const T>.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T>>>
  View(const View<U, Device>& o) : data(o.data), rows(o.rows), cols(o.cols), ld(o.ld) {}

  index_t size() const { return rows * cols; }
  bool empty() const { return rows == 0 || cols == 0; }
  bool contiguous() const { return ld == cols; }
  MXD_HOST_DEVICE T& operator()(index_t r, index_t c) const { return data[r * ld + c]; }
  MXD_HOST_DEVICE T* row(index_t r) const { return data + r * ld; }
  /// Rows [begin, begin + count) as a view.
  View block_rows(index_t begin, index_t count) const { return {data + begin * ld, count, cols, ld}; }
};

template <class T, class Device = cpu>
using ConstView = View<const T, Device>;

namespace detail {
template <class T>
struct identity { using type = T; };
}  // namespace detail

/// A read-only view parameter whose T and Device are not deduced from it, so a View<T> or a
/// Tensor<T> converts to it; functions deduce T and Device from their other arguments.
template <class T, class Device>
using InView = View<const typename detail::identity<T>::type, typename detail::identity<Device>::type>;

/// Throws mxd::Error naming `what` unless `v` is [rows, cols].
template <class T, class Device>
void check_shape(const View<T, Device>& v, index_t rows, index_t cols, const char* what) {
  MXD_CHECK(v.rows == rows && v.cols == cols, what, " has shape [", v.rows, ", ", v.cols,
            "], expected [", rows, ", ", cols, "]");
  MXD_CHECK(v.data != nullptr || v.size() == 0, what, " is a null view of shape [", rows, ", ",
            cols, "]");
}

template <>
struct memory<cpu> {
  static constexpr std::size_t alignment = 64;  // one cache line, and AVX-512 loads
  static void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    void* p = ::operator new(bytes, std::align_val_t(alignment));
    return p;
  }
  static void deallocate(void* p) {
    if (p) ::operator delete(p, std::align_val_t(alignment));
  }
  static void zero(void* p, std::size_t bytes) {
    if (bytes) std::memset(p, 0, bytes);
  }
  static void copy(void* dst, const void* src, std::size_t bytes) {
    if (bytes) std::memcpy(dst, src, bytes);
  }
  /// Copies host memory into this device's memory (here: also the host).
  static void upload(void* dst, const void* host_src, std::size_t bytes) { copy(dst, host_src, bytes); }
  /// Copies this device's memory into host memory (here: also the host).
  static void download(void* host_dst, const void* src, std::size_t bytes) { copy(host_dst, src, bytes); }
};

/// An owning, contiguous row-major matrix [rows, cols] in Device memory. resize() reallocates
/// only when the capacity must grow, so a workspace reused across steps stops allocating.
///
/// Tensor::borrow(data, rows, cols) makes one over memory someone else owns (another
/// framework's tensor): it is never freed here and cannot grow, so Params, Grads and AdamW
/// run on that memory with no copy. A copy of any Tensor owns its storage.
template <class T, class Device = cpu>
class Tensor {
public:
  Tensor() = default;
  Tensor(index_t rows, index_t cols) { resize(rows, cols); }
  ~Tensor() {
    if (owned_) memory<Device>::deallocate(data_);
  }
  /// A tensor over `data` (contiguous row-major [rows, cols], alive as long as this tensor).
  static Tensor borrow(T* data, index_t rows, index_t cols) {
    MXD_CHECK(rows >= 0 && cols >= 0 && (rows == 0 || rows * cols / rows == cols),
              "Tensor::borrow: invalid shape [", rows, ", ", cols, "]");
    MXD_CHECK(data != nullptr || rows * cols == 0, "Tensor::borrow: null data for shape [", rows,
              ", ", cols, "]");
    Tensor t;
    t.data_ = data;
    t.rows_ = rows;
    t.cols_ = cols;
    t.capacity_ = rows * cols;
    t.owned_ = false;
    return t;
  }
  Tensor(const Tensor& o) : Tensor(o.rows_, o.cols_) {
    memory<Device>::copy(data_, o.data_, bytes());
  }
  Tensor(Tensor&& o) noexcept { swap(o); }
  Tensor& operator=(Tensor o) noexcept {
    swap(o);
    return *this;
  }
  void swap(Tensor& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(rows_, o.rows_);
    std::swap(cols_, o.cols_);
    std::swap(capacity_, o.capacity_);
    std::swap(owned_, o.owned_);
  }

  /// Sets the shape; new contents are zero whenever storage is (re)allocated or `zero` is set.
  void resize(index_t rows, index_t cols, bool zero = true) {
    MXD_CHECK(rows >= 0 && cols >= 0, "Tensor::resize: negative shape [", rows, ", ", cols, "]");
    // Checked before multiplying: rows * cols * sizeof(T) bytes must fit a ptrdiff_t.
    constexpr index_t max_elements = PTRDIFF_MAX / static_cast<index_t>(sizeof(T));
    MXD_CHECK(rows == 0 || cols <= max_elements / rows, "Tensor::resize: shape [", rows, ", ",
              cols, "] overflows");
    const index_t n = rows * cols;
    if (n > capacity_) {
      MXD_CHECK(owned_, "Tensor::resize: a borrowed tensor of ", capacity_,
                " values cannot grow to [", rows, ", ", cols, "]");
      memory<Device>::deallocate(data_);
      data_ = nullptr;
      capacity_ = 0;
      data_ = static_cast<T*>(memory<Device>::allocate(static_cast<std::size_t>(n) * sizeof(T)));
      capacity_ = n;
      zero = true;
    }
    rows_ = rows;
    cols_ = cols;
    if (zero) set_zero();
  }
  void set_zero() { memory<Device>::zero(data_, bytes()); }

  T* data() { return data_; }
  const T* data() const { return data_; }
  index_t rows() const { return rows_; }
  index_t cols() const { return cols_; }
  index_t size() const { return rows_ * cols_; }
  std::size_t bytes() const { return static_cast<std::size_t>(size()) * sizeof(T); }
  /// False for a tensor made by borrow().
  bool owns_memory() const { return owned_; }

  View<T, Device> view() { return {data_, rows_, cols_}; }
  View<const T, Device> view() const { return {data_, rows_, cols_}; }
  operator View<T, Device>() { return view(); }
  operator View<const T, Device>() const { return view(); }

  /// Element access; host tensors only.
  T& operator()(index_t r, index_t c) {
    static_assert(std::is_same_v<Device, cpu>, "element access needs host memory");
    return data_[r * cols_ + c];
  }
  const T& operator()(index_t r, index_t c) const {
    static_assert(std::is_same_v<Device, cpu>, "element access needs host memory");
    return data_[r * cols_ + c];
  }
  T& operator[](index_t i) {
    static_assert(std::is_same_v<Device, cpu>, "element access needs host memory");
    return data_[i];
  }
  const T& operator[](index_t i) const {
    static_assert(std::is_same_v<Device, cpu>, "element access needs host memory");
    return data_[i];
  }

private:
  T* data_ = nullptr;
  index_t rows_ = 0, cols_ = 0, capacity_ = 0;
  bool owned_ = true;  // false: borrow()ed memory, freed by its owner
};

}  // namespace mxd
