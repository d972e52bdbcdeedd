from twisted.application.service import ServiceMaker

bearerbridge = ServiceMaker("bearerbridge", "bearerbridge.tap",
                            "OAuth 2.0 authorization server and SASL authority", "bearerbridge")
