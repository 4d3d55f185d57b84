// multiply_add.h as the x86-64 baseline CPU kernels build it (-march=x86-64: no FMA instruction, the emulation in
// double rounded to odd) against libm's fmaf, which is correctly rounded, bit for bit: random bit patterns (every
// exponent, subnormals, infinities and NaNs among them), products cancelled by their own negation and its
// neighbours, products on a midpoint, operands of the magnitudes an optimizer meets, and every triple of special
// values.
//
// argv[1]: how many random draws; stdout: the count of triples checked and of mismatches; exit status 1 if any.
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>

#include "fused_optim/multiply_add.h"

#ifndef FO_EMULATED_FMA
#error "build without FMA instructions (-march=x86-64): this checks the emulation"
#endif

namespace {

uint64_t checked = 0, mismatches = 0;

void check(float a, float b, float c) {
  const float expected = std::fma(a, b, c);  // a libm call here: no FMA instruction to contract into
  const float ours = fused_optim::multiply_add(a, b, c);
  ++checked;
  const bool both_nan = std::isnan(expected) && std::isnan(ours);
  if (!both_nan && std::bit_cast<uint32_t>(expected) != std::bit_cast<uint32_t>(ours) && mismatches++ < 10) {
    std::printf("%a * %a + %a: fmaf %a, multiply_add %a\n", a, b, c, expected, ours);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const long draws = argc > 1 ? std::atol(argv[1]) : 1000000;
  std::mt19937_64 random(0);
  for (long i = 0; i < draws; ++i) {
    const uint64_t r = random(), s = random();
    const float a = std::bit_cast<float>(static_cast<uint32_t>(r));
    const float b = std::bit_cast<float>(static_cast<uint32_t>(r >> 32));
    check(a, b, std::bit_cast<float>(static_cast<uint32_t>(s)));
    const float product = a * b;  // its negation cancels the product's leading bits; the neighbours leave a few
    check(a, b, -product);
    check(a, b, std::bit_cast<float>(std::bit_cast<uint32_t>(-product) + static_cast<int32_t>(s >> 60) - 8));
    // a product on a midpoint of two floats (25 significant bits), nudged by a tiny addend: rounding the sum to
    // double first would round the nudge away and leave a tie
    const float odd = std::bit_cast<float>(static_cast<uint32_t>(0x3F800001u | (r & 0x7FFFFEu)));
    check(odd, 1.5f, std::ldexp(s & 1 ? 1.0f : -1.0f, -60 - static_cast<int>((s >> 1) & 63)));
    // an lr or a decay, a gradient, a param
    const float scalar = std::ldexp(static_cast<float>(r & 0xFFFFFF), -24 - static_cast<int>((s >> 32) & 15));
    const float x = std::ldexp(static_cast<float>(static_cast<int32_t>(r >> 32)), -31 - static_cast<int>(s >> 60));
    const float y = std::ldexp(static_cast<float>(static_cast<int32_t>(s)), -31 - static_cast<int>((s >> 48) & 15));
    check(scalar, x, y);
    check(-scalar, x, y);
  }
  const float inf = std::numeric_limits<float>::infinity();
  const float specials[] = {0.0f, -0.0f, inf, -inf, std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::denorm_min(), -std::numeric_limits<float>::denorm_min(),
                            std::numeric_limits<float>::min(), std::numeric_limits<float>::max(),
                            -std::numeric_limits<float>::max(), 1.0f, -1.0f, 0.1f};
  for (const float a : specials) {
    for (const float b : specials) {
      for (const float c : specials) check(a, b, c);
    }
  }
  std::printf("%llu %llu\n", static_cast<unsigned long long>(checked), static_cast<unsigned long long>(mismatches));
  return mismatches == 0 ? 0 : 1;
}
