#ifndef ACTIOND_E2E_GREET_H_
#define ACTIOND_E2E_GREET_H_

#include <string>

std::string Greet(const std::string& who);

#endif  // ACTIOND_E2E_GREET_H_
