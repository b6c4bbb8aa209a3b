#include <iostream>

#include "cc/greet.h"

int main() {
  const std::string got = Greet("actiond");
  if (got != "Hello, actiond!") {
    std::cerr << "Greet(\"actiond\") = \"" << got << "\"" << std::endl;
    return 1;
  }
  std::cout << "PASS" << std::endl;
  return 0;
}
